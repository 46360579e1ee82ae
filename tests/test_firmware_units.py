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
print("pending", [s for _, s, _ in b.pending()], "dropped", b.dropped, "first", b.first(1))
b = Buffer("buf.log", capacity=5)  # after a reboot
print("reopened", [s for _, s, _ in b.pending()], "dropped", b.dropped)
b.ack(1, 6)
print("after ack", [s for _, s, _ in b.pending()])
b.add(2, 1, '{"seq": 1}')
b.compact()
print("compacted", [(bt, s) for bt, s, _ in b.pending()], "lines", b.count)
""")
    lines = out.splitlines()
    assert lines[0] == "pending [4, 5, 6, 7, 8] dropped 3 first 4"
    assert lines[1] == "reopened [4, 5, 6, 7, 8] dropped 3"
    assert lines[2] == "after ack [7, 8]"
    assert lines[3] == "compacted [(1, 7), (1, 8), (2, 1)] lines 3"


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


def test_buffer_does_not_compact_under_a_reader(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
import os
from buffer import Buffer
b = Buffer("buf.log", capacity=100)
for seq in range(1, 41):
    b.add(1, seq, '{"seq": %d}' % seq)
walk = b.pending()
seen = [next(walk)[1] for _ in range(3)]
inode = os.stat("buf.log")[1]
b.ack(1, 30)  # would compact now, but a reader is mid-walk
print("same file", os.stat("buf.log")[1] == inode, "lines", b.count)
seen += [s for _, s, _ in walk]
print("after walk lines", b.count, "pending", [s for _, s, _ in b.pending()][:3])
""")
    lines = out.splitlines()
    assert lines[0] == "same file True lines 40"
    assert lines[1] == "after walk lines 10 pending [31, 32, 33]"


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
        "reopened 20 dropped 1 last 30 lines 20",  # the torn reading is counted lost and gone from the file
        "boot 2 [(1, 30), (2, 1), (2, 2), (2, 3)]",  # the next append starts on a line of its own
        "both acked 1 None 3"]
