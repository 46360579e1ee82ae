"""Firmware modules on the real MicroPython interpreter: the flash buffer's bound and trim, the twin rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

from edgetrio.tools.vdev import FIRMWARE, micropython


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
