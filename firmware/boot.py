# Runs at every boot and at every soft reset, mpremote's raw-REPL ones included, so it holds no state of its own:
# boots are counted in main.py, which a board runs only when it starts the firmware.
import gc

import machine


def arm_watchdog():
    """A board that is set up (has a config) runs with its watchdog from the first line, at every soft reset too: a
    board that mpremote or a Ctrl-C left in the REPL resets into its firmware when the watchdog expires, whether or
    not this port keeps a watchdog across soft resets. A blank board (no config yet) has none, so flashing it is
    never cut short."""
    try:
        import json

        with open("config.json") as f:
            timeout = json.load(f).get("watchdog_ms", 60000)
    except (OSError, ValueError):
        return
    if timeout:
        machine.WDT(timeout=int(timeout))


arm_watchdog()
del arm_watchdog
gc.collect()
