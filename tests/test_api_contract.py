"""The relay's OpenAPI document against its server, by schemathesis (a tool nobody here wrote): every operation with
the document's own examples and its coverage cases (valid and invalid values at each bound). It found 405s without
`Allow`, a TRACE answered 404, bounds the server kept and the document did not, statuses it did not declare, and
a body field typed string that took null."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from edgetrio.tools.testkit import Relay, needs


def test_the_relay_answers_as_its_openapi_document_says(tmp_path: Path) -> None:
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    needs(schemathesis is not None, "schemathesis (a dev dependency)")
    assert schemathesis is not None
    relay = Relay(tmp_path / "relay").start()
    try:
        relay.add_node("gw1")
        relay.json("device", "add", "gw1", "d1")
        token = json.loads((relay.data_dir / "operator.json").read_text())["token"]
        # A rollout's bundle must be a whole firmware (importable module names, node.mpy among them): more than
        # OpenAPI 3.0 can say of an object's keys, so for that one operation a 400 answers schema-valid data too.
        (tmp_path / "schemathesis.toml").write_text(
            '[[operations]]\ninclude-path = "/api/rollouts"\ninclude-method = "POST"\n'
            'checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]\n')
        checked = subprocess.run(
            [schemathesis, "run", f"{relay.api_url}/openapi.json", "-H", f"Authorization: Bearer {token}",
             "--phases", "examples,coverage", "--checks", "all", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        summary = checked.stdout[checked.stdout.rfind("SUMMARY"):]
        assert checked.returncode == 0, checked.stdout[-6000:] + checked.stderr[-2000:]
        assert "passed" in summary and "failed" not in summary.split("Test cases:")[-1], summary
    finally:
        relay.stop()
