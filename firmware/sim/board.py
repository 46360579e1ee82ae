# The simulated board's start-up, run by the MicroPython unix port in the device's flash directory. As an ESP32 does,
# it runs boot.py, then main.py, with lib/ on the path; after a soft reset (argument "soft") it runs boot.py, and
# main.py only if the soft reset came from the friendly REPL (argument "raw": mpremote's raw REPL runs boot.py only).
import sys

# the simulated hardware first, from the host's firmware/sim: once the flash is mounted at "/" only it can be seen
import esp32  # noqa: F401
import machine  # noqa: F401
import network  # noqa: F401
import time  # noqa: F401

if machine.exists("sim/board.json"):  # a board file's parts: their models, before the flash hides them
    import onewire  # noqa: F401
    import parts  # noqa: F401

import flashfs

flashfs.mount_flash()
sys.path.append("lib")  # relative to "/", the flash (the unix port does not import through "/lib")
sys.path.append("")
scripts = ("boot.py",) if "raw" in sys.argv[1:] else ("boot.py", "main.py")
for script in scripts:
    try:
        with open(script) as f:
            code = f.read()
    except OSError:
        continue
    exec(code, {"__name__": "__main__"})
