"""One real tree: no links in the checkout, and the type checker follows the gateway's code into the shared layer
at the paths git and the docs use (with edgetrio/daemon a link, mypy reported edgetrio/daemon/x.py while git said
daemon/x.py, and tools that do not follow links saw none of it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from edgetrio.tools.testkit import ROOT, needs


def test_the_checkout_holds_no_links() -> None:
    needs((ROOT / ".git").exists(), "a git checkout")
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [line.split("\t")[1] for line in listed.splitlines() if line.startswith("120000")] == []
    assert not [p for p in (ROOT / "edgetrio").rglob("*") if p.is_symlink()]


def test_a_type_error_across_packages_is_reported_at_its_real_path(tmp_path: Path) -> None:
    """A call from the gateway into the shared web layer with a wrong argument, planted in a copy of the tree."""
    shutil.copytree(ROOT / "edgetrio", tmp_path / "edgetrio", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "edgetrio" / "daemon" / "web.py"
    line = len(target.read_text().splitlines()) + 4
    target.write_text(target.read_text() + "\n\ndef _planted() -> None:\n    web.readings_query(2)\n")
    checked = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / ".cache"),
                              "--follow-imports", "silent", "edgetrio/daemon/web.py"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert f"edgetrio/daemon/web.py:{line}: error: Argument 1 to \"readings_query\" has incompatible type" \
        in checked.stdout, checked.stdout + checked.stderr
