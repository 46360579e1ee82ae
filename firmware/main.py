# Runs when the board starts its firmware (power-on, reset, a soft reset at the friendly REPL), never for mpremote's
# raw-REPL soft resets. Boots and failed boots are counted first, before anything that could crash, so a boot loop
# is seen; main clears the failed count once the gateway has acknowledged a reading.
import json
import os

try:
    with open("state.json") as f:
        state = json.load(f)
except (OSError, ValueError):
    state = {"boot": 0, "failed_boots": 0}
state["boot"] = state.get("boot", 0) + 1
state["failed_boots"] = state.get("failed_boots", 0) + 1
with open("state.json.tmp", "w") as f:
    json.dump(state, f)
os.rename("state.json.tmp", "state.json")
del state
import node  # noqa: E402

node.run()
