"""Firmware over the air, on virtual boards running the real firmware: an update confirmed with nothing lost, a bundle
that cannot start rolled back by the board itself, a transfer cut by a power loss resumed where it was, and the
board's receiver refusing what does not match its manifest (in MicroPython, against the firmware's own module)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from edgetrio.daemon.ota import bundle_files, bundle_id
from edgetrio.tools.bundle import FIRMWARE, device_tool
from edgetrio.tools.testkit import Daemon, cli, contiguous_per_boot, make_bundle, virtual_boards, wait_until


def meta_of(daemon: Daemon, device: str) -> dict[str, Any]:
    listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
    meta: dict[str, Any] = listed.get(device, {}).get("meta") or {}
    return meta


def status_of(daemon: Daemon, device: str) -> dict[str, Any]:
    update: dict[str, Any] = json.loads(daemon.cli("ota", device, "--status", "--json").stdout) or {}
    return update


def test_an_update_is_confirmed_and_nothing_is_lost(daemon: Daemon, tmp_path: Path) -> None:
    new = make_bundle(tmp_path, "0.2.0-test")
    new_id = bundle_id(bundle_files(new / "lib"))
    with virtual_boards(daemon, "ota", 1, period=0.5) as (device,):
        flashed = wait_until(lambda: meta_of(daemon, device).get("bundle"), timeout=90)
        # this edgetrio's own firmware is what the board runs: built, sent nothing, confirmed at once
        same = cli(daemon.data_dir, "ota", device, timeout=120)
        assert f"{device} confirmed bundle {flashed[:12]}" in same.stdout
        done = cli(daemon.data_dir, "ota", device, "--bundle", str(new), timeout=300)
        assert f"updating {device} to bundle {new_id[:12]}" in done.stdout
        assert "restarting:" in done.stdout and "sending:" in done.stdout and "installed:" in done.stdout
        assert f"{device} confirmed bundle {new_id[:12]}" in done.stdout and "firmware 0.2.0-test" in done.stdout
        meta = wait_until(lambda: (m := meta_of(daemon, device)) and not m.get("trial") and m, timeout=30)
        assert meta["firmware"] == "0.2.0-test" and meta["bundle"] == new_id[:12] and "updating" not in meta
        update = status_of(daemon, device)
        assert update["state"] == "confirmed" and update["position"] == update["total"] > 0
        manifest = len("".join(f"{n} {s} {h}\n" for n, s, h in bundle_files(new / "lib")))
        assert update["total"] + manifest <= update["sent"] < update["total"] + manifest + 8192  # no byte many times
        # it keeps reading, and every reading of every boot (before, while and after) is stored once
        boot = max(r["boot"] for r in daemon.readings(device))
        wait_until(lambda: len([r for r in daemon.readings(device) if r["boot"] == boot]) >= 3, timeout=60)
        rows = daemon.readings(device)
        assert len(contiguous_per_boot(rows)) >= 2  # the first boot, the update's, the new firmware's
        again = cli(daemon.data_dir, "ota", device, "--bundle", str(new), timeout=120)
        assert f"{device} confirmed bundle {new_id[:12]}" in again.stdout  # already runs it: nothing sent
        steps = [e["body"]["state"] for e in json.loads(daemon.cli("logs", device, "--json").stdout)
                 if e["kind"] == "ota"]
        # on the device's log, in order (a board asked where it is while on trial also says `trial`)
        after = steps[steps.index("restarting"):]
        assert after.index("installed") < after.index("confirmed") and after[-1] == "confirmed", steps
        assert f"[firmware update] bundle {new_id[:12]} installed" in daemon.cli("logs", device).stdout


def test_a_bundle_that_cannot_start_is_rolled_back_by_the_board(daemon: Daemon, tmp_path: Path) -> None:
    broken = make_bundle(tmp_path, "0.3.0-broken", 'raise ImportError("broken on purpose")')
    with virtual_boards(daemon, "otb", 1, period=0.5) as (device,):
        flashed = wait_until(lambda: meta_of(daemon, device).get("bundle"), timeout=90)
        done = cli(daemon.data_dir, "ota", device, "--bundle", str(broken), check=False, timeout=300)
        assert done.returncode == 1, done.stdout + done.stderr
        # with what the last try died of: a board in the field has no console to read
        assert ("update rolled back: the new firmware did not confirm in 3 boots; the last: ImportError: broken on "
                "purpose") in done.stderr
        # back on what it ran, and reading again: a new boot's readings arrive and are acknowledged
        meta = wait_until(lambda: (m := meta_of(daemon, device)) and m.get("bundle") == flashed and m, timeout=60)
        assert meta["firmware"] == "0.1.0" and "trial" not in meta
        boot = meta["boot"]
        wait_until(lambda: [r for r in daemon.readings(device) if r["boot"] == boot], timeout=60)
        contiguous_per_boot(daemon.readings(device))
        console = (daemon.data_dir / "vdevs" / device / "console.log").read_text()
        assert console.count("broken on purpose") == 3  # each of the three tries, then back


def test_a_transfer_cut_by_a_power_loss_resumes_where_it_was(daemon: Daemon, tmp_path: Path) -> None:
    # big enough that the cut below lands mid-transfer however fast the link is (197 KB was sent whole before it)
    big = make_bundle(tmp_path, "0.4.0-big", padding=560_000)
    big_id = bundle_id(bundle_files(big / "lib"))
    with virtual_boards(daemon, "otc", 1, period=0.5) as (device,):
        wait_until(lambda: meta_of(daemon, device).get("bundle"), timeout=90)
        cli(daemon.data_dir, "ota", device, "--bundle", str(big), "--no-wait")
        first = wait_until(lambda: (u := status_of(daemon, device)) and u["position"] > 20_000 and u, timeout=120)
        assert first["state"] == "sending"
        daemon.cli("fault", device, "wifi", "down")  # the link goes, then the power
        daemon.cli("fault", device, "power")
        cut_at = status_of(daemon, device)["position"]
        daemon.cli("fault", device, "wifi", "up")
        done = wait_until(lambda: (u := status_of(daemon, device))["state"] == "confirmed" and u, timeout=240)
        # the board resumed from what its staging folder held: where the gateway knew it was, give or take the chunk
        # whose answer the cut lost (written, or cut off in the middle: LittleFS keeps a file's last whole write)
        assert done["resumed_from"] > 0 and abs(done["resumed_from"] - cut_at) < 4096, (done, cut_at)
        assert done["sent"] < done["total"] + 8192  # nothing sent twice but the chunk the cut lost
        assert meta_of(daemon, device).get("bundle") == big_id[:12]


def test_a_bundle_a_board_could_not_take_is_refused_before_anything_is_sent(daemon: Daemon, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "0.5.0")
    daemon.add_device("otd-1")
    (bundle / "lib" / "ota.mpy").unlink()  # it would confirm, and never take an update over the air again
    refused = daemon.cli("ota", "otd-1", "--bundle", str(bundle), check=False)
    assert refused.returncode == 1 and "no ota.mpy: not a whole firmware bundle" in refused.stderr
    make_bundle(tmp_path / "b", "0.5.0")
    (tmp_path / "b" / "bundle-0.5.0" / "lib" / "a b.mpy").write_bytes(b"x")
    refused = daemon.cli("ota", "otd-1", "--bundle", str(tmp_path / "b" / "bundle-0.5.0"), check=False)
    assert refused.returncode == 1 and "'a b.mpy': a module's name is letters" in refused.stderr
    for flags, message in ((["--confirm-timeout", "nan"], "--confirm-timeout: 30 to 86400"),
                           (["--confirm-timeout", "0"], "--confirm-timeout: 30 to 86400"),
                           (["--status", "--cancel"], "--status or --cancel, not both")):
        refused = daemon.cli("ota", "otd-1", *flags, check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    unknown = daemon.cli("ota", "nosuch", "--status", check=False)
    assert unknown.returncode == 1 and "nosuch" in unknown.stderr
    assert not (daemon.data_dir / "bundles").exists() or not any(
        (daemon.data_dir / "bundles").glob("*/a b.mpy"))  # nothing of a refused bundle is kept


def test_stored_bundles_no_update_uses_go_after_a_day(tmp_path: Path) -> None:
    from edgetrio.daemon.ota import prune_bundles

    for name in ("a" * 64, "b" * 64, ".staging-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "node.mpy").write_bytes(b"x")
    day_ago = time.time() - 90_000
    for name in ("a" * 64, ".staging-x"):
        os.utime(tmp_path / name, (day_ago, day_ago))
    assert prune_bundles(tmp_path, set(), time.time()) == [".staging-x", "a" * 64]
    assert (tmp_path / ("b" * 64)).is_dir()  # staged an hour ago: an update may be about to use it
    os.utime(tmp_path / ("b" * 64), (day_ago, day_ago))
    assert prune_bundles(tmp_path, {"b" * 64}, time.time()) == []  # an update in progress uses it


def test_the_boards_receiver_takes_only_what_its_manifest_says(tmp_path: Path) -> None:
    """The firmware's ota.py in MicroPython: a manifest not matching the bundle id, a file whose bytes do not match
    its sha256, a chunk out of step, a name that would leave lib/: each refused, and a good bundle installed."""
    good = b"print('hello')\n"
    files = [["app.mpy", len(good), __import__("hashlib").sha256(good).hexdigest()]]
    text = "".join(f"{n} {s} {h}\n" for n, s, h in files)
    ident = bundle_id(files)
    script = tmp_path / "t.py"
    script.write_text(f"""
import json
from ota import Receiver, load

class Client:
    max_in = 4352  # a chunk of up to 4096 bytes and its header

class Link:
    client = Client()

class Node:
    board = None
    version = "t"
    link = Link()

def run(r, head, data=b""):
    try:  # as node.py answers
        print(json.dumps(r.begin(head) if head.get("op") == "begin" else r.chunk(head, memoryview(data))))
    except ValueError as e:
        print(json.dumps({{"state": "failed", "reason": str(e)}}))

ident, text, good = {ident!r}, {text!r}.encode(), {good!r}
r = Receiver(Node())
begin = {{"op": "begin", "bundle": ident, "count": 2, "size": len(text), "total": len(good)}}
run(r, begin)
run(r, {{"bundle": ident, "file": 0, "offset": 0}}, text.replace(b"app", b"bad"))   # not the manifest of this id
run(r, {{"bundle": ident, "file": 0, "offset": 5}}, text)                         # out of step
run(r, {{"bundle": ident, "file": 0, "offset": 0}}, text)
run(r, {{"bundle": ident, "file": 1, "offset": 0}}, b"print('evil!')\\n")           # same size, other bytes
run(r, {{"bundle": ident, "file": 1, "offset": 0}}, good)
print(json.dumps(load()))
evil = b"x.mpy 1 " + b"0" * 64 + b"\\n"
import hashlib, binascii
evil = b"../" + evil
bad_id = binascii.hexlify(hashlib.sha256(evil).digest()).decode()
r2 = Receiver(Node())
run(r2, {{"op": "begin", "bundle": bad_id, "count": 2, "size": len(evil), "total": 1}})
run(r2, {{"bundle": bad_id, "file": 0, "offset": 0}}, evil)
class Wired(Node):
    board = object()  # sensors on: it would restart to receive, but not for a bundle its flash cannot hold
run(Receiver(Wired()), {{"op": "begin", "bundle": "c" * 64, "count": 2, "size": 10, "total": 10 ** 15}})
print(json.dumps(load()))
""")
    proc = subprocess.run([device_tool("micropython"), str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"MICROPYPATH": f"{FIRMWARE / 'lib'}:{FIRMWARE / 'sim'}:.frozen"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert out[0] == {"bundle": ident, "state": "receiving", "file": 0, "offset": 0, "chunk": 4096}
    assert out[1]["offset"] == 0 and "manifest.txt: sha256 does not match" in out[1]["error"]
    assert out[2] == out[0]  # out of step: told where to go on
    assert out[3]["file"] == 1 and out[3]["offset"] == 0
    assert "app.mpy: sha256 does not match" in out[4]["error"] and out[4]["offset"] == 0
    assert out[5]["state"] == "installed"
    assert out[6]["trial"] == "fw-" + ident[:12] and out[6]["trial_bundle"] == ident
    assert (tmp_path / ("fw-" + ident[:12]) / "app.mpy").read_bytes() == good
    # a manifest that names a file outside lib/ is refused even when its hash is right
    assert out[8]["state"] == "failed" and "a .mpy name" in out[8]["reason"]
    assert out[9]["state"] == "failed" and "not enough flash" in out[9]["reason"]
    assert not (tmp_path / ("fw-" + "c" * 12)).exists() and "receive" not in out[10]  # and no restart asked
