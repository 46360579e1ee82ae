"""Firmware modules on the real MicroPython interpreter: the flash buffer's bound and trim, the twin rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.vdev import FIRMWARE, micropython


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
