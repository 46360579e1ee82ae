"""Firmware modules on the real MicroPython interpreter: the flash buffer's bound and trim, the twin rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

from edgetrio.tools.bundle import FIRMWARE
from edgetrio.tools.vdev import micropython


def run_micropython(tmp_path: Path, code: str) -> str:
    script = tmp_path / "t.py"
    script.write_text(code)
    proc = subprocess.run([micropython(), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"MICROPYPATH": f"{FIRMWARE / 'lib'}:{FIRMWARE / 'sim'}:.frozen"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_buffer_is_bounded_survives_reopening_and_is_trimmed_by_acks(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
from buffer import Buffer
b = Buffer("buf.log", capacity=5)
for seq in range(1, 9):
    b.add(1, seq, '{"seq": %d}' % seq)
print("slack", [s for _, s, _ in b.pending()] == list(range(1, 9)), b.slack)
for seq in range(9, 15):
    b.add(1, seq, '{"seq": %d}' % seq)
print("pending", [s for _, s, _ in b.pending()], "dropped", b.dropped, "first", b.first(1))
b = Buffer("buf.log", capacity=5)  # after a reboot
print("reopened", [s for _, s, _ in b.pending()], "dropped", b.dropped)
b.ack(1, 12)
print("after ack", [s for _, s, _ in b.pending()])
b.add(2, 1, '{"seq": 1}')
b.compact()
print("compacted", [(bt, s) for bt, s, _ in b.pending()], "lines", b.count)
""")
    lines = out.splitlines()
    assert lines[0] == "slack True 8"  # up to capacity + slack before the oldest go, so a full buffer is not
    assert lines[1] == "pending [10, 11, 12, 13, 14] dropped 9 first 10"  # rewritten for every reading
    assert lines[2] == "reopened [10, 11, 12, 13, 14] dropped 9"
    assert lines[3] == "after ack [13, 14]"
    assert lines[4] == "compacted [(1, 13), (1, 14), (2, 1)] lines 3"


def test_twin_rules_refuse_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
from node import check_twin
for key, value in (("period", 5), ("period", 0), ("period", True), ("led", True), ("led", 1),
                   ("threshold", 0.5), ("threshold", -1), ("colour", "red")):
    print(key, value, check_twin(key, value))
""")
    assert out.splitlines() == [
        "period 5 None", "period 0 period must be 0.1..86400 s", "period True period must be 0.1..86400 s",
        "led True None", "led 1 led must be true or false", "threshold 0.5 None",
        "threshold -1 threshold must be a number >= 0", "colour red unknown key"]


def test_a_sender_reading_in_steps_survives_compaction_and_a_failed_send(tmp_path: Path) -> None:
    # The sender awaits between reads, so the buffer may be compacted mid-walk; a failed publish abandons the walk.
    # MicroPython never runs an abandoned generator's `finally`: a walk must not hold anything open.
    out = run_micropython(tmp_path, """
from buffer import Buffer
b = Buffer("buf.log", capacity=20)
for seq in range(1, 11):
    b.add(1, seq, '{"seq": %d}' % seq)
records, pos = b.read(0, 3)
print("first", [s for _, s, _ in records])
b.ack(1, 5)  # the sender stops here (a failed publish); acks keep coming
for seq in range(11, 201):
    b.add(1, seq, '{"seq": %d}' % seq)
    b.ack(1, seq - 2)
print("lines", b.count, "unacked", b.unacked(), "dropped", b.dropped)
records, pos = b.read(0, 100)  # a new walk from the start sees only what is left
print("pending", [s for _, s, _ in records])
more, pos = b.read(pos, 100)
print("end", more)
""")
    lines = out.splitlines()
    assert lines[0] == "first [1, 2, 3]"
    count = int(lines[1].split()[1])
    assert count <= 40 and lines[1].endswith("unacked 2 dropped 0"), lines[1]  # trimmed all along, nothing lost
    assert lines[2] == "pending [199, 200]"
    assert lines[3] == "end []"


def test_a_full_buffer_drops_the_oldest_without_rewriting_the_file_for_every_reading(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
from buffer import Buffer
b = Buffer("buf.log", capacity=100)
for seq in range(1, 301):
    b.add(1, seq, '{"seq": %d}' % seq)
records, _ = b.read(0, 1000)
seqs = [s for _, s, _ in records]
print(b.rewrites, b.unacked(), b.dropped, seqs[-1], seqs == list(range(seqs[0], 301)))
""")
    rewrites, unacked, dropped, last, contiguous = out.split()
    assert int(rewrites) <= 20, rewrites  # not one rewrite of the whole file per reading once full
    assert int(unacked) >= 100 and int(unacked) + int(dropped) == 300 and last == "300" and contiguous == "True"


def test_buffer_counts_without_reading_the_file_and_survives_a_torn_line(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
from buffer import Buffer
def check(b):  # the in-memory count against a walk of the file
    assert b.unacked() == len(list(b.pending())), (b.unacked(), len(list(b.pending())))
b = Buffer("buf.log", capacity=50)
for seq in range(1, 31):
    b.add(1, seq, '{"seq": %d}' % seq)
check(b)
b.ack(1, 10)
check(b)
print("acked", b.unacked(), b.first(1), b.count)
with open("buf.log", "a") as f:
    f.write('1 31 {"boot": 1, "values": {"t": 1}')  # the power went mid-write
b = Buffer("buf.log", capacity=50)  # the next boot
check(b)
print("reopened", b.unacked(), "dropped", b.dropped, "last", [s for _, s, _ in b.pending()][-1], "lines", b.count)
for seq in range(1, 4):
    b.add(2, seq, '{"seq": %d}' % seq)
check(b)
print("boot 2", [(bt, s) for bt, s, _ in b.pending()][-4:])
b.ack(1, 30)
b.ack(2, 2)
check(b)
print("both acked", b.unacked(), b.first(1), b.first(2))
""")
    assert out.splitlines() == [
        "acked 20 11 30",  # nothing compacted yet: 30 lines, 20 unacknowledged, from 11
        # the torn reading is counted lost and gone from the file; the ack watermark goes to flash at most every 30 s
        # (flash wear), so after a power cut acknowledged readings are offered again (the gateway keeps one of each)
        "reopened 30 dropped 1 last 30 lines 30",
        "boot 2 [(1, 30), (2, 1), (2, 2), (2, 3)]",  # the next append starts on a line of its own
        "both acked 1 None 3"]


def test_the_virtual_board_clock_starts_unset_and_keeps_time_across_resets_only(tmp_path: Path) -> None:
    (tmp_path / "sim").mkdir()
    power_on = run_micropython(tmp_path, """
import time, machine
print(time.gmtime(0)[0], time.gmtime()[:3], time.time() < 5)
machine.RTC().datetime((2026, 3, 4, 2, 5, 6, 7, 0))
print(time.gmtime()[:6])
""").split("\n")
    assert power_on[0] == "2000 (2000, 1, 1) True"  # the embedded epoch, unset, as an ESP32 starts
    assert power_on[1] == "(2026, 3, 4, 5, 6, 7)"
    soft_reset = run_micropython(tmp_path, "import time\nprint(time.gmtime()[:5])\n")
    assert soft_reset.strip() == "(2026, 3, 4, 5, 6)"  # a reset keeps the RTC's time
    (tmp_path / "sim" / "rtc").unlink()  # what the supervisor does on a power cut
    assert run_micropython(tmp_path, "import time\nprint(time.gmtime()[0])\n").strip() == "2000"


def test_the_bme280_driver_gives_the_datasheets_worked_example(tmp_path: Path) -> None:
    # Bosch's worked example (BMP280 datasheet 3.12, the same T and P compensation as the BME280): these calibration
    # words with adc_T 519888 and adc_P 415148 give t_fine 128422, 25.08 degC and 100653.27 Pa. The driver's integer
    # formulas and the simulated chip's floating-point ones (written separately) must both land on it.
    out = run_micropython(tmp_path, """
import bme280
from drv_bme280 import compensate_t, compensate_p
cal = {"T1": 27504, "T2": 26435, "T3": -1000, "P1": 36477, "P2": -10685, "P3": 3024, "P4": 2855, "P5": 140,
       "P6": -7, "P7": 15500, "P8": -14600, "P9": 6000}
t, fine = compensate_t(519888, cal)
print(t, fine, compensate_p(415148, fine, cal))
print(bme280.temperature(519888), bme280.pressure(415148, bme280.t_fine(519888)))
""")
    driver, model = out.splitlines()
    t, fine, p = (int(v) for v in driver.split())
    assert (t, fine) == (2508, 128422)
    assert abs(p / 256 - 100653.27) < 0.05  # Q24.8 Pa; the integer result is within its last bits of the example
    model_t, model_p = (float(v) for v in model.split())
    assert round(model_t, 2) == 25.08 and round(model_p, 2) == 100653.27


def test_the_driver_reads_back_what_an_independent_chip_model_was_set_to(tmp_path: Path) -> None:
    # The simulated chip finds its raw values with the datasheet's floating-point formulas; the driver uses the
    # integer ones. Each reads what the other wrote, to the sensor's resolution, across the range.
    (tmp_path / "sim").mkdir()
    out = run_micropython(tmp_path, """
import json, machine
from drv_bme280 import BME280
cases = [(-20.0, 850.0, 10.0), (0.5, 950.25, 33.3), (21.37, 1013.25, 45.0), (38.9, 1080.0, 90.0)]
for t, p, h in cases:
    with open("sim/env.json", "w") as f:
        json.dump({"temperature": t, "pressure": p, "humidity": h}, f)
    got = BME280(machine.I2C(0)).read()
    print(t, p, h, got["temperature"], got["pressure"], got["humidity"])
""")
    for line in out.splitlines():
        t, p, h, got_t, got_p, got_h = (float(v) for v in line.split())
        assert abs(got_t - t) <= 0.011 and abs(got_p - p) <= 0.011 and abs(got_h - h) <= 0.02, line


def test_a_bmp280_has_no_humidity_and_forced_mode_measures_on_request(tmp_path: Path) -> None:
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "sensor").write_text("bmp280")
    out = run_micropython(tmp_path, """
import json, machine
from drv_bme280 import BME280
def pin(t):
    with open("sim/env.json", "w") as f:
        json.dump({"temperature": t, "pressure": 1000.0, "humidity": 50.0}, f)
pin(20.0)
bus = machine.I2C(0)
forced = BME280(bus, mode="forced")
print(sorted(forced.read()), forced.names())
pin(30.0)
print(forced.read()["temperature"])  # asked for a measurement: sees the change
bus.writeto_mem(0x76, 0xF4, b"\\x24")  # sleep: the data registers keep the last measurement
pin(10.0)
d = bus.readfrom_mem(0x76, 0xF7, 8)
print(((d[3] << 12) | (d[4] << 4) | (d[5] >> 4)) == forced.last_adc_t)
""")
    lines = out.splitlines()
    assert lines[0] == "['pressure', 'temperature'] ['temperature', 'pressure']"
    assert lines[1] == "30.0"
    assert lines[2] == "True"


def test_every_virtual_board_has_its_own_weather(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
import environment
for name in ("greenhouse-1", "greenhouse-2", "cellar"):
    room = environment.Room(name)
    now = 1764700000
    a, b = room.at(now), room.at(now + 6 * 3600)
    print(name, round(a["temperature"], 2), round(b["temperature"], 2), round(a["pressure"], 2),
          round(a["humidity"], 1))
print(environment.Room("cellar").at(1764700000) == environment.Room("cellar").at(1764700000))
""")
    lines = out.splitlines()
    rooms = [line.split()[1:] for line in lines[:3]]
    assert len({tuple(r) for r in rooms}) == 3  # seeded per device: no two alike
    assert all(r[0] != r[1] for r in rooms)  # six hours later the day has moved on
    assert all(-10 < float(r[0]) < 40 and 950 < float(r[2]) < 1050 and 0 < float(r[3]) < 100 for r in rooms)
    assert lines[3] == "True"  # and the same board gets the same room on every run
