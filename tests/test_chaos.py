"""The short chaos run: virtual boards on the real firmware, kill -9 of the daemon and of the relay, Wi-Fi drops,
power cuts and a full disk; every acknowledged reading ends up at the edge and in the cloud exactly once."""

from __future__ import annotations

import os
from pathlib import Path

from edgetrio.tools.bench import chaos


def test_short_chaos_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("EDGETRIO_CHAOS_SEED", "20261129"))
    result = chaos.run(tmp_path, seed, boards=5, readings=3000, period=0.1, disk_mb=64,
                       first=("daemon", "relay", "wifi", "power", "disk"))
    print(result.report())
    assert result.faults.count("daemon") >= 1 and result.faults.count("relay") >= 1
    assert result.acknowledged >= 2500, "too little was acknowledged for the run to prove anything"
    assert result.ok, result.report()
