# A firmware update on trial (imported only then; kept small, since the board runs with its sensors meanwhile):
# confirmed at the first acknowledged reading, or restarted to try again if none comes (main.py goes back to what
# worked after a few tries).
import asyncio
import gc
import json
import os

import machine

FIRMWARE_FILE = "firmware.json"


async def watch(node):
    wait = node.firmware.get("confirm_s") or 300
    await asyncio.sleep(wait)
    if not node.healthy:
        node.log("info", "the new firmware has not been confirmed: restarting")
        node.firmware["error"] = "no reading acknowledged within %d s" % wait  # said with the rollback
        save(node.firmware)
        await asyncio.sleep(0.5)
        node.buffer.flush()
        machine.reset()


def remove_folder(folder):
    try:
        for entry in os.ilistdir(folder):
            os.remove(folder + "/" + entry[0])
        os.rmdir(folder)
    except OSError:
        pass


def save(fw):
    with open(FIRMWARE_FILE + ".tmp", "w") as f:
        json.dump(fw, f)
    os.rename(FIRMWARE_FILE + ".tmp", FIRMWARE_FILE)


async def confirm(node):
    """The trial works: it becomes the active folder (one atomic rename); the one before is kept for a rollback on
    request, older ones are removed; the gateway is told, with meta."""
    fw = node.firmware
    previous = fw.get("active") or "lib"
    fw["previous"], fw["previous_bundle"] = previous, fw.get("bundle")
    fw["active"], fw["bundle"] = fw.pop("trial"), fw.pop("trial_bundle", None)
    fw.pop("tries", None)
    fw.pop("confirm_s", None)
    fw.pop("error", None)
    save(fw)
    for entry in os.ilistdir():
        name = entry[0]
        if name.startswith("fw-") and name not in (fw["active"], previous) and entry[1] == 0x4000:
            remove_folder(name)
    for message in ("ota/status", "meta"):  # meta, the largest message a board sends, no longer says trial
        for _ in range(5):  # a heap that is short for a moment (readings going out beside) is not the end
            gc.collect()
            try:
                body = {"bundle": fw["bundle"], "state": "confirmed", "version": node.version} \
                    if message == "ota/status" else node.meta()
                if await node.link.publish(message, json.dumps(body)):
                    break
                print("confirm: %s not sent" % message)
            except MemoryError as e:
                print("confirm: %s: %r" % (message, e))
            await asyncio.sleep(1)
    if node.cfg.get("battery"):  # a battery board ran its trial awake: back to sleeping between readings
        await asyncio.sleep(1)
        node.buffer.flush()
        machine.reset()


def go_back(node):
    """Run the firmware kept from before the last update again (a rollback asked for): the two folders swap places
    in one atomic rename of firmware.json; the board restarts into it after answering."""
    fw = node.firmware
    previous = fw.get("previous")
    if not previous or fw.get("trial"):
        raise ValueError("no earlier firmware is kept on this board" if not previous else
                         "the board runs a new firmware on trial: it confirms or goes back by itself")
    fw["active"], fw["previous"] = previous, fw.get("active") or "lib"
    fw["bundle"], fw["previous_bundle"] = fw.get("previous_bundle"), fw.get("bundle")
    save(fw)
    return {"bundle": (fw["bundle"] or "")[:12], "restarting": True}
