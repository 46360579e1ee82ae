# The commands a board runs for the gateway (`cmd`), each answered on `cmd/result` with its id.
import asyncio
import json

import machine


async def command(node, cmd):
    """Run one command on `node` (a node.Node) and publish its result; `reboot` resets the board after."""
    name, args = cmd.get("name"), cmd.get("args") or {}
    result = {"id": cmd.get("id"), "ok": True}
    try:
        if name == "ping":
            result["value"] = "pong"
        elif name == "blink":
            for _ in range(int(args.get("times", 3))):
                node.led.value(1)
                await asyncio.sleep(0.1)
                node.led.value(0)
                await asyncio.sleep(0.1)
            node.led.value(1 if node.twin.get("led") else 0)
            result["value"] = "blinked"
        elif name == "read_now":
            if node.board is None:
                raise ValueError("safe mode: sensors are off")
            result["value"] = node.take_reading()
        elif name == "rollback":  # back to the firmware kept from before the last update
            from trial import go_back

            result["value"] = go_back(node)
        elif name == "reboot":
            if args.get("normal"):  # leave safe mode: the next boot starts with a clean count
                node.state["failed_boots"] = 0
                node.save_state()
            result["value"] = "rebooting"
        else:
            raise ValueError("unknown command %s" % name)
    except Exception as e:
        result = {"id": cmd.get("id"), "ok": False, "error": str(e)}
    await node.link.publish("cmd/result", json.dumps(result))
    if name in ("reboot", "rollback") and result["ok"]:
        await asyncio.sleep(0.5)
        node.buffer.flush()
        machine.reset()



def too_large(node, size, head):
    """A command too large to take gets an error result (its id is near the start) instead of a timeout at the
    gateway."""
    start = head.find(b'"id": "')
    end = head.find(b'"', start + 7) if start >= 0 else -1
    if end < 0:
        node.log("warning", "skipped a %d-byte command without a readable id" % size)
        return
    client = node.link.client
    limit = client.max_in if client is not None else 0
    result = {"id": head[start + 7:end].decode(), "ok": False,
              "error": "command too large (%d bytes; this board takes up to %d)" % (size, limit)}
    asyncio.create_task(node.link.publish("cmd/result", json.dumps(result)))
