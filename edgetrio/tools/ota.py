"""`edgetrio ota ID`: update a board's firmware over the air through the running gateway, with progress.

The bundle (built from this edgetrio's firmware, or one `edgetrio bundle DIR` wrote) is put into the gateway's
data dir under its id; the gateway sends it (edgetrio/daemon/ota.py) and this follows it to the board's confirmation.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgetrio.bundles import BundleError, files_of, read_bundle, stage
from edgetrio.daemon.config import ConfigError
from edgetrio.daemon.control import ControlClient, ControlError
from edgetrio.daemon.ota import BUNDLES, DONE
from edgetrio.tools.bundle import build_bundle, require_device_tools


class OtaError(Exception):
    """The update could not start or did not end confirmed; the message says why in one line."""


def stage_bundle(data_dir: Path, bundle: Path | None) -> tuple[str, list[list[Any]]]:
    """Put the bundle's .mpy files into DATA/bundles/<id>/ (once; a folder appears whole or not at all)."""
    with tempfile.TemporaryDirectory(prefix="edgetrio-ota-") as tmp:
        if bundle is None:
            try:
                require_device_tools()
            except RuntimeError as exc:
                raise OtaError(str(exc)) from exc
            bundle = build_bundle(Path(tmp) / "bundle")
        if not (bundle / "lib").is_dir():
            raise OtaError(f"{bundle}: no lib/ folder (a bundle is what `edgetrio bundle DIR` writes)")
        try:
            contents = read_bundle(bundle)
            ident = stage(data_dir / BUNDLES, contents)
        except BundleError as exc:
            raise OtaError(str(exc)) from exc
    return ident, files_of(contents, str(bundle))


def progress_line(update: dict[str, Any], began: float) -> str:
    total, position, sent = update["total"], update["position"], update["sent"]
    rate = sent / max(time.monotonic() - began, 1e-3) / 1024
    resumed = update.get("resumed_from")
    note = f", resumed at {resumed:,}" if resumed else ""
    return (f"  {update['state']}: {position:,} / {total:,} bytes ({100 * position // max(total, 1)}%), "
            f"{update['chunks']} chunks, {rate:.1f} KiB/s{note}")


def follow(data_dir: Path, control: ControlClient, device: str, as_json: bool, timeout: float) -> dict[str, Any]:
    """Print the update's progress until it ends (or `timeout`); returns its last state. A daemon restarted meanwhile
    is waited for: the update goes on where the board is."""
    began, deadline = time.monotonic(), time.monotonic() + timeout
    shown: tuple[Any, ...] = ()
    update: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            update = control.request("ota.status", {"id": device}) or {}
        except ControlError as exc:
            if exc.code not in ("timeout", "unreachable"):
                raise
            print(f"  the daemon does not answer ({exc}); waiting for it", file=sys.stderr, flush=True)
            control.close()
            control = reconnect(data_dir, deadline)
            continue
        step = (update.get("state"), update.get("position", 0) * 20 // max(update.get("total", 1), 1))
        if step != shown:  # a line per state and per 5 %: readable in a log, not a flood
            shown = step
            print(json.dumps(update) if as_json else progress_line(update, began), flush=True)
        if update.get("state") in DONE:
            return update
        time.sleep(0.3)
    raise OtaError(f"{device}: the update did not end within {timeout:g} s (it is {update.get('state')}; the gateway "
                   f"goes on with it: `edgetrio ota {device} --status`)")


def reconnect(data_dir: Path, deadline: float) -> ControlClient:
    while True:
        time.sleep(1)
        try:
            return ControlClient(data_dir)
        except (ControlError, ConfigError, OSError, KeyError, ValueError):
            if time.monotonic() > deadline:
                raise OtaError("the daemon did not come back; the update goes on when it does: `edgetrio ota ID "
                               "--status`") from None


def ota(data_dir: Path, device: str, bundle: Path | None, as_json: bool = False, wait: bool = True,
        timeout: float = 900, confirm_timeout: float = 300) -> dict[str, Any]:
    """Start updating `device` (the same bundle again goes on where it is) and follow it unless `wait` is False."""
    ident, files = stage_bundle(data_dir, bundle)  # staged before the daemon is asked: it reads it from there
    try:
        with ControlClient(data_dir) as control:
            update = control.request("ota.start", {"id": device, "bundle": ident, "confirm_s": int(confirm_timeout)})
            if not as_json:
                print(f"updating {device} to bundle {ident[:12]} ({len(files)} files, {update['total']:,} bytes)"
                      f"{'' if update.get('online') else ': it is offline, the update starts when it connects'}",
                      flush=True)
            if not wait:
                return dict(update)
            update = follow(data_dir, control, device, as_json, timeout)
    except ControlError as exc:
        raise OtaError(str(exc)) from exc
    if update["state"] != "confirmed":
        raise OtaError(f"{device}: update {update['state']}: {update['detail']}")
    if not as_json:
        print(f"{device} confirmed bundle {ident[:12]}: {update['detail']}", flush=True)
    return update


def control_op(data_dir: Path, op: str, device: str | None) -> Any:
    try:
        with ControlClient(data_dir) as control:
            return control.request(op, {"id": device} if device else {})
    except ControlError as exc:
        raise OtaError(str(exc)) from exc


def print_update(update: dict[str, Any] | None, device: str) -> None:
    if not update:
        print(f"{device}: no firmware update on record", file=sys.stderr)
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(update["started"]))
    print(f"{update['device']}: bundle {update['bundle'][:12]} {update['state']} (started {when}; "
          f"{update['position']:,}/{update['total']:,} bytes){': ' + update['detail'] if update['detail'] else ''}")
