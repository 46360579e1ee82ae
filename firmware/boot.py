# Runs first at every boot: count boots and failed boots (main clears the latter once the gateway has acked).
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
