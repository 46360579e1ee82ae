# The firmware's start, imported by main.py (compiled to start.mpy at the flash's root: compiling this as source at
# every boot would take heap the firmware needs). Not updated over the air: it is what makes going back possible.
#
# Boots and failed boots are counted first, before anything that could crash, so a boot loop is seen; the node clears
# the failed count once the gateway has acknowledged a reading. Then it picks the firmware folder: lib/ as flashed, or
# the one an update over the air installed (firmware.json). A new folder is a trial until the board confirms it;
# after TRIES boots without that, the board goes back to the folder that worked and reports why.
import json
import os
import sys

import machine

TRIES = 3


def load(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def save(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.rename(path + ".tmp", path)


state = load("state.json", {"boot": 0, "failed_boots": 0})
# a battery board's wake from deep sleep goes on with the boot it slept in (its seq is kept in RTC memory), and is
# not a new try: most wakes never reach the gateway, by design
woke = machine.reset_cause() == machine.DEEPSLEEP_RESET
state["boot"] = state.get("boot", 0) + (0 if woke else 1)
state["failed_boots"] = state.get("failed_boots", 0) + (0 if woke else 1)
fw = load("firmware.json", {})
folder = fw.get("active") or "lib"
trial = fw.get("trial")
if trial:
    fw["tries"] = fw.get("tries", 0) + 1
    if fw["tries"] > TRIES:  # it never confirmed: back to what worked, whose boots are not failures
        error = fw.pop("error", None)  # what the last try died of, if it said
        fw["failed"] = {"bundle": fw.get("trial_bundle"),
                        "reason": "the new firmware did not confirm in %d boots%s"
                                  % (TRIES, "; the last: " + error if error else "")}
        fw["trial"], trial = None, None
        state["failed_boots"] = 1
    else:
        folder = trial
    save("firmware.json", fw)
if not woke:
    save("state.json", state)  # a wake writes nothing here: one flash write fewer per reading
fw_save = save
sys.path[:] = [("/" + folder if p == "/lib" else folder) if p in ("lib", "/lib") else p for p in sys.path]
del state, load, save, woke
try:
    import node  # noqa: E402

    node.run()
except Exception as e:
    if not trial:
        raise
    sys.print_exception(e)
    fw["error"] = ("%s: %s" % (type(e).__name__, e))[:160]  # said with the rollback: a board has no console
    fw_save("firmware.json", fw)
    machine.reset()  # a trial that fails at once tries again now, not when the watchdog fires
