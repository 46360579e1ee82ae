"""edgetrio: ESP32 sensor nodes running MicroPython, a trio gateway daemon, and a small cloud relay.

The subpackages live in the repository's top-level folders (linked here): `edgetrio.daemon` (the gateway),
`edgetrio.cloud` (the relay), `edgetrio.tools` (flashing, virtual boards, the demo) and the firmware as package data.
"""
