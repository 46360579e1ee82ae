# Runs when the board starts its firmware (power-on, reset, a soft reset at the friendly REPL), never for mpremote's
# raw-REPL soft resets. The work is in start.mpy, compiled ahead: a source file here is compiled at every boot.
import start  # noqa: F401
