"""The relay's dashboard in a real headless Chromium (Debian's, driven by Selenium): log in, watch a virtual board's
plot grow, change its twin and see the board report it, a version conflict, a command button, a viewer who cannot
change anything, and a wrong password refused. The readings come the whole way: board -> gateway -> relay -> page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgetrio.tools.testkit import ROOT, Daemon, Probe, Relay, greenhouse_board, virtual_boards, wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BOARD = "greenhouse-1"
SHOTS = Path(os.environ["EDGETRIO_SCREENSHOTS"]) if os.environ.get("EDGETRIO_SCREENSHOTS") else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relay, Daemon]]:
    base = tmp_path_factory.mktemp("dash")
    relay = Relay(base / "relay").start()
    token = relay.add_node("gw1")
    relay.add_user("adam", "admin", "admin-password-1")
    relay.add_user("vera", "viewer", "viewer-password-1")
    daemon = Daemon(base / "gw", extra=("--cloud", relay.url, "--node-id", "gw1", "--token", token)).start()
    try:
        with greenhouse_board(daemon):
            wait_until(lambda: any(d["id"] == BOARD and d["online"] for d in relay.json("devices")), timeout=90)
            yield relay, daemon
    finally:
        daemon.stop()
        relay.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            raise AssertionError("chromium and chromium-driver are missing (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(driver: Any, predicate: Any, timeout: float = 30) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    # a live page re-renders: an element read just as it was replaced is looked up again, and one not there yet is
    # waited for (not ignoring it failed the wait at its first look whenever the page was slower than the test)
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(
        lambda d: predicate(d))


def find(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, css)


def found(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By
    return list(driver.find_elements(By.CSS_SELECTOR, css))


def log_in(driver: Any, relay: Relay, name: str, password: str) -> None:
    driver.get(relay.api_url + "/")
    wait(driver, lambda d: found(d, "#login-name"))
    find(driver, "#login-name").send_keys(name)
    find(driver, "#login-password").send_keys(password)
    find(driver, "#login-submit").click()


def points(driver: Any, resource: str) -> int:
    count: int = driver.execute_script(
        "const c = window.edgetrio.charts[arguments[0]]; return c ? c.data[0].length : -1;", resource)
    return count


def test_an_admin_watches_the_board_changes_its_twin_and_runs_a_command(stack: tuple[Relay, Daemon],
                                                                         browser: Any) -> None:
    relay, _daemon = stack
    log_in(browser, relay, "adam", "not-the-password")
    wait(browser, lambda d: "wrong name or password" in find(d, "#login-error").text)
    find(browser, "#login-password").clear()
    find(browser, "#login-password").send_keys("admin-password-1")
    find(browser, "#login-submit").click()
    wait(browser, lambda d: "adam (admin)" in find(d, "#whoami").text)
    wait(browser, lambda d: "gw1" in find(d, "#nodes").text and BOARD in find(d, "#devices").text)
    # what the gateway refused and rejected reaches the fleet page: a stranger's login, a bad reading
    _relay, daemon = stack
    stranger = Probe(daemon, "nobody", "wrong", "stranger")
    assert not stranger.accepted()
    stranger.close()
    password = daemon.add_device("bad-board")
    board = Probe(daemon, "bad-board", password, "bad-board")
    assert board.accepted()
    board.publish("edgetrio/bad-board/telemetry", b"{not json")
    board.close()
    browser.refresh()
    wait(browser, lambda d: find(d, '#nodes tr[data-node="gw1"] .count-rejected').text not in ("-", "0")
         and find(d, '#nodes tr[data-node="gw1"] .count-refused').text not in ("-", "0"), timeout=60)
    operator = json.loads((relay.data_dir / "operator.json").read_text())["token"]
    request = urllib.request.Request(f"{relay.api_url}/api/nodes/gw1/devices/bad-board/rejects",
                                     headers={"authorization": f"Bearer {operator}"})
    with urllib.request.urlopen(request, timeout=30) as reply:  # what the gateway refused went up the link too
        assert [r["reason"] for r in json.loads(reply.read())] == ["malformed_json"]
    # a rule fires at the gateway: its alert shows on the fleet page as it comes up the link
    assert "No open alerts" in find(browser, "#alerts").text
    rules = daemon.data_dir.parent / "frost.toml"
    rules.write_text(f'[[rule]]\nname = "frost-watch"\ndevices = ["{BOARD}"]\nwhen = "temperature > -100"\n'
                     'severity = "critical"\n')
    daemon.cli("rule", "add", str(rules))
    wait(browser, lambda d: "frost-watch" in find(d, "#alerts tr.alert-firing").text
         and BOARD in find(d, "#alerts").text, timeout=60)
    # acknowledged on the page: the edge, which holds the alert, is told and sends it back acknowledged
    find(browser, "#alerts button.ack").click()
    wait(browser, lambda d: "acked by adam" in find(d, "#alerts tr.alert-firing").text)
    wait_until(lambda: json.loads(daemon.cli("alerts", "--json").stdout)[0]["acked_by"] == "adam", timeout=30)
    if SHOTS:
        browser.save_screenshot(str(SHOTS / "dashboard-fleet.png"))

    browser.get(f"{relay.api_url}/#/device/gw1/{BOARD}")
    wait(browser, lambda d: points(d, "temperature") > 0)
    first = points(browser, "temperature")
    wait(browser, lambda d: points(d, "temperature") >= first + 3)  # live: the plot grows without a reload
    assert {p.get_attribute("data-resource") for p in found(browser, ".plot")} >= {"temperature", "humidity",
                                                                                    "pressure"}
    # the twin: desired led=true goes down to the board, which reports it; the page shows the report
    find(browser, "#twin-patch").send_keys('{"led": true}')
    find(browser, "#twin-apply").click()
    wait(browser, lambda d: "Desired version" in find(d, "#twin-message").text)
    wait(browser, lambda d: json.loads(find(d, "#twin-reported").text).get("led") is True, timeout=60)
    # someone else changes it meanwhile: the stale edit is refused as a conflict, and the page says so
    request = urllib.request.Request(f"{relay.api_url}/api/nodes/gw1/devices/{BOARD}/twin", method="PATCH",
                                     data=json.dumps({"desired": {"threshold": 1}}).encode(),
                                     headers={"authorization": f"Bearer {operator}",
                                              "content-type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    find(browser, "#twin-patch").send_keys('{"led": false}')
    find(browser, "#twin-apply").click()
    wait(browser, lambda d: "Conflict" in find(d, "#twin-message").text)
    # a command button and its result
    find(browser, 'button.cmd[data-name="ping"]').click()
    wait(browser, lambda d: "pong" in find(d, "#cmd-result").text, timeout=40)
    # a command with arguments, and one that restarts the board asks first (dismissed: nothing is sent)
    find(browser, "#cmd-args").send_keys("times=1")
    find(browser, 'button.cmd[data-name="blink"]').click()
    wait(browser, lambda d: find(d, "#cmd-result").text == 'blink: "blinked"', timeout=40)
    find(browser, 'button.cmd[data-name="reboot"]').click()
    wait(browser, lambda d: d.switch_to.alert).dismiss()
    assert find(browser, "#cmd-result").text == 'blink: "blinked"'
    # the board's log lines (its status among them) came up the link with everything else
    assert "status online" in find(browser, "#log-lines").text
    if SHOTS:
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(SHOTS / "dashboard-device.png"))
    # the CSV download link serves the readings
    href = find(browser, "#csv").get_attribute("href")
    csv_text = browser.execute_async_script(
        "fetch(arguments[0]).then(r => r.text()).then(arguments[1])", href)
    assert csv_text.splitlines()[0].startswith("time_utc,ts,ts_arrival,boot,seq,") and len(csv_text.splitlines()) > 3


def test_a_boards_settings_have_controls_and_the_board_reports_what_they_set(stack: tuple[Relay, Daemon],
                                                                            browser: Any) -> None:
    relay, _daemon = stack
    log_in(browser, relay, "adam", "admin-password-1")
    wait(browser, lambda d: "adam (admin)" in find(d, "#whoami").text)
    browser.get(f"{relay.api_url}/#/device/gw1/{BOARD}")
    led = wait(browser, lambda d: found(d, "#control-led") and find(d, "#control-led"))
    wanted = not led.is_selected()
    led.click()  # a switch: the board sets its LED and reports it; the switch follows the report
    wait(browser, lambda d: json.loads(find(d, "#twin-reported").text).get("led") is wanted, timeout=60)
    wait(browser, lambda d: find(d, "#control-led-value").text == ("on" if wanted else "off"))
    box = find(browser, "#control-threshold")
    assert box.get_attribute("type") == "number"  # 0 to unbounded: a box, not a slider
    box.clear()
    box.send_keys("0.5\n")
    wait(browser, lambda d: json.loads(find(d, "#twin-reported").text).get("threshold") == 0.5, timeout=60)


def test_a_viewer_sees_but_cannot_change_anything(stack: tuple[Relay, Daemon], browser: Any) -> None:
    relay, _daemon = stack
    log_in(browser, relay, "vera", "viewer-password-1")
    wait(browser, lambda d: "vera (viewer)" in find(d, "#whoami").text)
    browser.get(f"{relay.api_url}/#/device/gw1/{BOARD}")
    wait(browser, lambda d: points(d, "temperature") > 0)
    assert not found(browser, "#twin-apply")
    assert all(not b.is_enabled() for b in found(browser, "button.cmd"))
    # and the relay refuses it even when the page is bypassed (with the session's own CSRF token)
    status = browser.execute_async_script("""
        const done = arguments[0];
        fetch('/api/me').then(r => r.json()).then(me => fetch('/api/nodes/gw1/devices/greenhouse-1/twin', {
            method: 'PATCH', headers: {'content-type': 'application/json', 'x-csrf-token': me.csrf},
            body: JSON.stringify({desired: {led: false}})})).then(r => done(r.status));""")
    assert status == 403


@pytest.mark.parametrize("width", [390, 1400], ids=["phone", "desktop"])
def test_every_range_is_held_to_its_span_and_the_page_fits_the_screen(stack: tuple[Relay, Daemon], browser: Any,
                                                                      width: int) -> None:
    relay, _ = stack
    browser.set_window_size(width, 900)
    log_in(browser, relay, "adam", "admin-password-1")
    wait(browser, lambda d: found(d, "#nodes"))
    fits = "return document.documentElement.scrollWidth <= window.innerWidth + 1"
    assert browser.execute_script(fits), "the fleet page is wider than the screen"
    for name, span in (("1h", 3600), ("24h", 86400), ("7d", 604800)):
        browser.get(f"{relay.api_url}/#/device/gw1/{BOARD}?range={name}")
        browser.refresh()
        wait(browser, lambda d: points(d, "temperature") > 0)
        low, high = browser.execute_script(
            "const s = window.edgetrio.charts.temperature.scales.x; return [s.min, s.max];")
        now = time.time()
        assert abs(high - now) < 120 and abs((high - low) - span) < span * 0.02, (name, low, high, now)
        assert browser.execute_script(fits), f"the device page at {name} is wider than the screen"
        assert find(browser, '.plot[data-resource="temperature"] h3').text == "temperature (C)"  # with its unit



def test_a_nodes_page_shows_its_link_counters_alerts_rules_and_devices(stack: tuple[Relay, Daemon],
                                                                      browser: Any) -> None:
    """A node's page was a bare device table: it shows the edge's link, its counts, its alerts, the rule set the cloud
    applied and what the edge did with it (a rule on a resource the board lacks is applied in part), its devices;
    the gateway's own page shows its rules the same way."""
    relay, daemon = stack
    rules = daemon.data_dir.parent / "fleet-rules.toml"
    rules.write_text('[[rule]]\nname = "damp"\ndevices = ["*"]\nwhen = "humidity > 99"\n'
                     '[[rule]]\nname = "gusty"\ndevices = ["*"]\nwhen = "wind > 10"\n')
    relay.cli("rules", "apply", "gw1", str(rules))
    wait_until(lambda: "(applied" in relay.cli("rules", "show", "gw1").stdout, timeout=60)
    log_in(browser, relay, "vera", "viewer-password-1")
    wait(browser, lambda d: found(d, '#nodes a[href="#/node/gw1"]'))
    find(browser, '#nodes a[href="#/node/gw1"]').click()
    wait(browser, lambda d: found(d, "#node-summary") and "linked" in find(d, "#node-summary").text)
    summary = find(browser, "#node-summary").text
    count = len(relay.json("devices"))
    assert f"{count} device{'' if count == 1 else 's'}\n" in summary + "\n" and "online" in summary, summary
    assert find(browser, "#node-counters .count-readings").text.split(": ")[1].isdigit()
    wait(browser, lambda d: "frost-watch" in find(d, "#alerts").text, timeout=60)  # the edge's alert, on its node's page
    shown = find(browser, "#rules").text
    assert "applied in part" in shown and "rule damp: humidity > 99" in shown, shown
    assert "unknown resource 'wind'" in find(browser, '#rules li[data-rule="gusty"]').text, shown
    assert BOARD in find(browser, "#devices").text
    # the gateway's page, for the same node: its rules, the cloud's set among them, with the same reasons
    admin_user, admin_password = daemon.admin()
    browser.get(f"http://{daemon.http}/")
    wait(browser, lambda d: found(d, "#login-name") or found(d, "#whoami"))
    if found(browser, "#login-name"):
        find(browser, "#login-name").send_keys(admin_user)
        find(browser, "#login-password").send_keys(admin_password)
        find(browser, "#login-submit").click()
    browser.get(f"http://{daemon.http}/#/node/gw1")
    wait(browser, lambda d: found(d, '#rules li[data-rule="frost-watch"]'))
    assert "unknown resource 'wind'" in find(browser, '#rules li[data-rule="gusty"]').text
    assert "applied in part" in find(browser, "#rules").text


def test_a_rollout_is_on_the_fleet_page_and_its_own_with_each_board(stack: tuple[Relay, Daemon], browser: Any) -> None:
    """A rollout of the firmware the board runs already: the board confirms at once (nothing is sent). The fleet page
    lists it; its page shows each board's state as it moves, and the viewer has no buttons to steer it."""
    relay, _daemon = stack
    bundle = relay.data_dir.parent / "same-firmware"
    subprocess.run([sys.executable, "-m", "edgetrio", "bundle", str(bundle)], check=True, capture_output=True,
                   timeout=120)
    created = relay.json("rollout", "create", "--bundle", str(bundle), "--select", f"device={BOARD}")
    log_in(browser, relay, "vera", "viewer-password-1")
    wait(browser, lambda d: found(d, f'#rollouts tr[data-rollout="{created["id"]}"] a'))
    find(browser, f'#rollouts tr[data-rollout="{created["id"]}"] a').click()
    wait(browser, lambda d: "done" in find(d, "#rollout-summary").text, timeout=120)  # live: the page follows it
    row = find(browser, f'#rollout-boards tr[data-device="{BOARD}"]').text
    assert "confirmed" in row and "gw1" in row, row
    assert "1 of 1 confirmed" in find(browser, "#rollout-summary").text
    assert not found(browser, "#rollout-summary button")  # a viewer steers nothing
    assert relay.json("rollout", "status", created["id"])["state"] == "done"


def test_a_contacts_state_is_shown_and_follows_the_board(stack: tuple[Relay, Daemon], browser: Any) -> None:
    """A door contact reports true or false: no plot for it, its state now, changing as the board reports it."""
    relay, daemon = stack
    board_file = ROOT / "examples" / "boards" / "greenhouse.toml"
    with virtual_boards(daemon, "door", 1, period=0.5, extra=("--board", str(board_file))) as (device,):
        wait_until(lambda: any(d["id"] == device and d["online"] for d in relay.json("devices")), timeout=90)
        daemon.cli("fault", device, "env", "gpio13=0")  # the reed contact closed: the door is shut
        wait_until(lambda: any(r["values"].get("door") is False for r in daemon.readings(device, missing_ok=True)),
                   timeout=60)
        log_in(browser, relay, "vera", "viewer-password-1")
        wait(browser, lambda d: found(d, "#whoami") and "vera" in find(d, "#whoami").text)
        browser.get(f"{relay.api_url}/#/device/gw1/{device}")
        wait(browser, lambda d: "door: off" in find(d, '#states [data-state="door"]').text, timeout=60)
        assert not found(browser, '.plot[data-resource="door"]')
        daemon.cli("fault", device, "env", "gpio13=1")  # opened: the page follows without a reload
        wait(browser, lambda d: "door: on" in find(d, '#states [data-state="door"]').text, timeout=60)


def test_the_gateway_serves_the_same_dashboard_with_the_relay_gone(stack: tuple[Relay, Daemon], browser: Any) -> None:
    relay, daemon = stack
    relay.stop()  # the internet is down: the gateway's own page goes on
    assert daemon.http
    admin_user, admin_password = daemon.admin()
    proc = subprocess.run([sys.executable, "-m", "edgetrio", "user", "add", "gina", "--role", "viewer",
                           "--password-stdin", "--data-dir", str(daemon.data_dir)], input="gina-password-1\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    site = f"http://{daemon.http}"
    browser.get(site + "/")
    wait(browser, lambda d: found(d, "#login-name"))
    find(browser, "#login-name").send_keys(admin_user)  # the data dir's admin credential is the local admin
    find(browser, "#login-password").send_keys(admin_password)
    find(browser, "#login-submit").click()
    wait(browser, lambda d: f"{admin_user} (admin)" in find(d, "#whoami").text)
    wait(browser, lambda d: BOARD in find(d, "#devices").text)
    assert "frost-watch" in find(browser, "#alerts tr.alert-firing").text  # the gateway's own alerts too
    # its own counts, as the relay's page shows them (it showed "-"): the first test's refused login and bad reading
    counts = {k: find(browser, f'#nodes tr[data-node="gw1"] .count-{k}').text
              for k in ("refused", "rejected", "dropped", "outbox_rows")}
    assert all(v.isdigit() for v in counts.values()) and int(counts["refused"]) >= 1 and int(counts["rejected"]) >= 1, \
        counts
    browser.get(f"{site}/#/device/gw1/{BOARD}")
    wait(browser, lambda d: points(d, "temperature") > 0)
    # the twin (threshold back to 0: the first test's threshold 1 holds back readings that change less)
    find(browser, "#twin-patch").send_keys('{"led": false, "threshold": 0}')
    find(browser, "#twin-apply").click()
    wait(browser, lambda d: json.loads(find(d, "#twin-reported").text).get("led") is False, timeout=60)
    first = points(browser, "temperature")
    wait(browser, lambda d: points(d, "temperature") >= first + 3)
    find(browser, 'button.cmd[data-name="ping"]').click()
    wait(browser, lambda d: "pong" in find(d, "#cmd-result").text, timeout=40)
    # the gateway also has the board's log lines (its status among them) and what it refused: nothing of this
    # board, and the bad board's malformed reading of the first test
    assert "status online" in find(browser, "#log-lines").text
    assert find(browser, "#rejects").text == "(nothing refused)"
    if SHOTS:
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(SHOTS / "gateway-device.png"))
    browser.get(f"{site}/#/device/gw1/bad-board")
    wait(browser, lambda d: "malformed_json" in find(d, "#rejects").text)
    # a viewer made with `edgetrio user add` looks and cannot change
    find(browser, "#logout").click()
    wait(browser, lambda d: found(d, "#login-name"))
    find(browser, "#login-name").send_keys("gina")
    find(browser, "#login-password").send_keys("gina-password-1")
    find(browser, "#login-submit").click()
    wait(browser, lambda d: "gina (viewer)" in find(d, "#whoami").text)
    browser.get(f"{site}/#/device/gw1/{BOARD}")
    wait(browser, lambda d: points(d, "temperature") > 0)
    assert not found(browser, "#twin-apply") and all(not b.is_enabled() for b in found(browser, "button.cmd"))


def test_a_gateway_event_stream_outlives_the_request_timeout(stack: tuple[Relay, Daemon]) -> None:
    import socket

    _relay, daemon = stack
    host, port = daemon.http.split(":")
    _user, secret = daemon.admin()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET /api/stream?kinds=node HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\n\r\n"
                     .encode())
        received, deadline = b"", time.monotonic() + 18  # past the 15 s a request may take, and one heartbeat
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            assert chunk, f"the stream was closed after {18 - (deadline - time.monotonic()):.1f} s: {received!r}"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK") and b"retry: 2000" in received and b": idle" in received


