"""Firmware bundles: the .mpy files flashing writes into a board's lib/, named by the sha256 of their manifest.

One definition for every place that handles a bundle: `edgetrio ota` staging it, the gateway sending it to a board,
the relay storing one for a rollout and sending it down to its gateways (a board computes the same id: ota.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

FILE_NAME = re.compile(r"[A-Za-z0-9_]{1,40}\.mpy")
# a bundle without these could not start, or could never be updated over the air again
REQUIRED = ("node.mpy", "ota.mpy", "trial.mpy")
# bytes of all its files: more than an ESP32's LittleFS keeps beside the running firmware (a 1.5 MiB partition holds
# two), and what fits the relay's 1 MiB API requests once in base64
MAX_BUNDLE = 640 * 1024


class BundleError(ValueError):
    """Not a bundle a board can take; the message says why in one line."""


def check_files(files: list[list[Any]], where: str) -> list[list[Any]]:
    """The [name, size, sha256] list of a bundle, checked: importable names, the modules every update needs."""
    for name, _, _ in files:
        if not FILE_NAME.fullmatch(name):
            raise BundleError(f"{where}: {name[:60]!r}: a module's name is letters, digits and _ (up to 40), then .mpy")
    names = {name for name, _, _ in files}
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise BundleError(f"{where}: no {', '.join(missing)}: not a whole firmware bundle (what `edgetrio bundle "
                          f"DIR` writes); without ota.mpy and trial.mpy a board could not be updated over the air "
                          "again")
    if sum(size for _, size, _ in files) > MAX_BUNDLE:
        raise BundleError(f"{where}: {sum(size for _, size, _ in files) // 1024} KiB, over the {MAX_BUNDLE // 1024} "
                          "KiB a bundle may have (a board keeps the running firmware and this one on its flash)")
    return sorted(files)


def bundle_files(lib: Path) -> list[list[Any]]:
    """The .mpy files of a bundle's lib folder as a board checks them: [name, size, sha256], sorted by name;
    BundleError for a name a board's import cannot take, a link, or a module every update needs missing."""
    files = []
    for p in sorted(lib.glob("*.mpy")):
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"{p}: not a plain file (a link is not sent)")
        files.append([p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()])
    return check_files(files, str(lib))


def files_of(contents: dict[str, bytes], where: str) -> list[list[Any]]:
    """The checked [name, size, sha256] list of a bundle given as its files' bytes."""
    return check_files([[name, len(data), hashlib.sha256(data).hexdigest()] for name, data in contents.items()], where)


def manifest(files: list[list[Any]]) -> bytes:
    """A bundle's manifest, the first file a board receives: its files' 'name size sha256' lines, sorted."""
    return "".join(f"{n} {s} {h}\n" for n, s, h in sorted(files)).encode()


def bundle_id(files: list[list[Any]]) -> str:
    """A bundle's id: the sha256 of its manifest (a board checks the manifest against it, then each file)."""
    return hashlib.sha256(manifest(files)).hexdigest()


def read_bundle(bundle: Path) -> dict[str, bytes]:
    """The files of a bundle folder (what `edgetrio bundle DIR` writes: DIR/lib/*.mpy), checked."""
    lib = bundle / "lib" if (bundle / "lib").is_dir() else bundle
    if not lib.is_dir():
        raise BundleError(f"{bundle}: no such folder (a bundle is what `edgetrio bundle DIR` writes)")
    files = bundle_files(lib)
    return {name: (lib / name).read_bytes() for name, _, _ in files}


def intact(folder: Path, ident: str) -> bool:
    try:
        return bundle_id(bundle_files(folder)) == ident
    except (BundleError, OSError):
        return False


def stage(folder: Path, contents: dict[str, bytes]) -> str:
    """Keep a bundle in folder/<id>/ (once; a folder appears whole or not at all, a damaged copy is replaced);
    returns its id."""
    ident = bundle_id(files_of(contents, "bundle"))
    target = folder / ident
    if target.is_dir() and not intact(target, ident):
        shutil.rmtree(target)
    if not target.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        for name, data in contents.items():
            (staging / name).write_bytes(data)
            (staging / name).chmod(0o600)  # as the rest of the data dir
        staging.rename(target)
    os.utime(target)  # used now: kept a day from now (the daemon prunes unused ones)
    return ident
