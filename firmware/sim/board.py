# The simulated board's start-up, run by the MicroPython unix port in the device's flash directory:
# like an ESP32 it runs boot.py, then main.py, with lib/ on the path. firmware/sim supplies the hardware.
import sys

sys.path.append("lib")
sys.path.append("")
for script in ("boot.py", "main.py"):
    try:
        with open(script) as f:
            code = f.read()
    except OSError:
        continue
    exec(code, {"__name__": "__main__"})
