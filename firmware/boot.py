# Runs at every boot and at every soft reset, mpremote's raw-REPL ones included, so it holds no state of its own:
# boots are counted in main.py, which a board runs only when it starts the firmware.
import gc

gc.collect()
