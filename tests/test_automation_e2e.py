"""The greenhouse of docs/automation.md end to end: a rule set applied from the cloud while the gateway is offline
takes effect when it connects; then, with the relay down the whole time, a virtual board running the real firmware
gets hot, the rule fires after its `for`, the board's LED goes on and is reported, one notification reaches a real
HTTP receiver; it cools down, the alert resolves, a second notification; the relay back, the alert is on it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgetrio.tools.testkit import ROOT, Daemon, Receiver, Relay, cli, greenhouse_board, wait_until

BOARD = "greenhouse-1"


def greenhouse_rules(path: Path, receiver: Receiver) -> Path:
    """The rule file of docs/automation.md, with `for` shortened and the receiver's address."""
    doc = (ROOT / "docs" / "automation.md").read_text()
    text = re.search(r"```toml\n# greenhouse.toml\n(.*?)```", doc, re.S)
    assert text is not None
    rules = text.group(1).replace('for = "2m"', 'for = "3s"').replace('cooldown = "10m"', 'cooldown = "1s"')
    path.write_text(rules.replace("json://127.0.0.1:8099/hook", receiver.url))
    return path


def test_greenhouse_from_the_cloud_with_the_relay_down(tmp_path: Path) -> None:
    receiver = Receiver()
    relay = Relay(tmp_path / "relay").start()
    token = relay.add_node("gw1")
    rules = greenhouse_rules(tmp_path / "greenhouse.toml", receiver)
    # the gateway is not running yet: the rule set waits at the relay
    assert re.search(r"gw1: rule set version \d+ queued \(1 rules, 1 schedules\)",
                     relay.cli("rules", "apply", "gw1", str(rules)).stdout)
    assert "waiting for the node" in relay.cli("rules", "show", "gw1").stdout
    # a viewer sees the rule set, not the secrets in its notification URLs
    relay.cli("user", "add", "vic", "--role", "viewer")
    viewer_token = relay.json("user", "token", "vic")["token"]
    shown = json.loads(relay.cli("rules", "show", "gw1", "--json", "--token", viewer_token, "--url", relay.api_url).stdout)
    assert shown["doc"]["rule"][0]["notify"] == ["json://(hidden)"]
    assert relay.json("rules", "show", "gw1")["doc"]["rule"][0]["notify"] == [receiver.url]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\ndevices = ["*"]\nwhen = "temperature >"\n')
    refused = relay.cli("rules", "apply", "gw1", str(bad), check=False)
    assert refused.returncode == 2 and "syntax error" in refused.stderr

    gw = Daemon(tmp_path / "gw", extra=("--cloud", relay.url, "--node-id", "gw1", "--token", token))
    gw.data_dir.mkdir(parents=True)
    gw.start()
    try:
        story(relay, gw, receiver)
    finally:
        gw.stop()
        relay.stop()
        receiver.close()


def story(relay: Relay, gw: Daemon, receiver: Receiver) -> None:
    with greenhouse_board(gw):
        wait_until(lambda: "(applied)" in relay.cli("rules", "show", "gw1").stdout, timeout=30)
        listed = json.loads(gw.cli("rule", "list", "--json").stdout)
        assert [(r["name"], r["source"]) for r in listed] == [("greenhouse-hot", "cloud"), ("morning-check", "cloud")]
        wait_until(lambda: any(d["id"] == BOARD and d["online"] for d in
                               json.loads(gw.cli("device", "list", "--json").stdout)), timeout=90)
        relay.stop()  # the internet is gone for the rest of the story

        cli(gw.data_dir, "fault", BOARD, "env", "temperature=35")
        wait_until(lambda: len(receiver.posts) == 1, timeout=60)
        fired = gw.alerts()[0]
        assert fired["state"] == "firing" and fired["device"] == BOARD and fired["values"]["temperature"] > 34
        assert fired["fired"] - fired["started"] >= 3  # it held for `for` first (the daemon's own times)
        assert receiver.posts[0]["title"] == f"[FIRING] greenhouse-hot on {BOARD} (critical)"
        # the vent: desired led=true reached the board, and the board reports it
        wait_until(lambda: twin(gw)["reported"]["state"].get("led") is True, timeout=30)

        cli(gw.data_dir, "fault", BOARD, "env", "temperature=20")
        wait_until(lambda: len(receiver.posts) == 2, timeout=60)
        assert receiver.posts[1]["title"] == f"[RESOLVED] greenhouse-hot on {BOARD} (critical)"
        wait_until(lambda: twin(gw)["reported"]["state"].get("led") is False, timeout=30)
        assert gw.alerts("--all")[0]["state"] == "resolved"
        # nothing more: no repeats, no flapping, over the cool readings that follow (counted, not slept on)
        seen = len(json.loads(gw.cli("readings", BOARD, "--limit", "100000", "--json").stdout))
        wait_until(lambda: len(json.loads(gw.cli("readings", BOARD, "--limit", "100000", "--json").stdout)) >= seen + 5)
        events = [h["event"] for h in json.loads(gw.cli("rule", "history", "greenhouse-hot", "--json").stdout)]
        assert events[-2:] == ["resolved", "action_ok"] and events.count("firing") == 1, events
        assert len(receiver.posts) == 2

        relay.start()  # back: the alert's story goes up the link
        wait_until(lambda: [a["state"] for a in relay.json("alerts", "--all")] == ["resolved"], timeout=30)
        assert relay.json("alerts") != []  # resolved but not acknowledged: still listed as open
        # acknowledged from the cloud: the gateway, which holds the alert, is told
        assert "acknowledged by" in relay.cli("alerts", "ack", "gw1", str(fired["id"])).stdout
        assert relay.json("alerts") == []
        wait_until(lambda: gw.alerts("--all")[0]["acked"] is not None, timeout=30)
        assert gw.alerts() == []


def twin(gw: Daemon) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(gw.cli("twin", "get", BOARD, "--json").stdout)
    return found
