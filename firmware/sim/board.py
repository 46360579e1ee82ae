# The simulated board's start-up, run by the MicroPython unix port in the device's flash directory. As an ESP32 does,
# it runs boot.py, then main.py, with lib/ on the path; after a soft reset (argument "soft") it runs boot.py, and
# main.py only if the soft reset came from the friendly REPL (argument "raw": mpremote's raw REPL runs boot.py only).
import sys

sys.path.append("lib")
sys.path.append("")
scripts = ("boot.py",) if "raw" in sys.argv[1:] else ("boot.py", "main.py")
for script in scripts:
    try:
        with open(script) as f:
            code = f.read()
    except OSError:
        continue
    exec(code, {"__name__": "__main__"})
