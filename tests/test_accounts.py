"""Operator accounts on the relay: roles on every write endpoint, session cookies with CSRF, API tokens, expiry;
node tokens rotated and nodes removed with their live links closed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from edgetrio.tools.testkit import Relay
from edgetrio.wire import envelope

# every write endpoint with a body it accepts (the node and device exist; commands need an online node)
WRITES = [
    ("PATCH", "/api/fleet/twin", {"desired": {"led": True}}),
    ("POST", "/api/nodes/n1/devices", {"id": "d-new"}),
    ("PATCH", "/api/nodes/n1/devices/d1/twin", {"desired": {"period": 5}}),
    ("POST", "/api/nodes/n1/devices/d1/commands", {"name": "ping", "timeout": 1}),
    ("POST", "/api/nodes/n1/token", {}),
    ("DELETE", "/api/nodes/n1", {}),
]


class Client:
    """A browser-like HTTP client: keeps cookies, sends JSON."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf = ""

    def call(self, method: str, path: str, body: Any = None, csrf: bool = True) -> tuple[int, Any, Any]:
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if csrf and self.csrf:
            headers["x-csrf-token"] = self.csrf
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=30) as reply:
                raw = reply.read()
                return reply.status, (json.loads(raw) if reply.headers.get_content_type() == "application/json"
                                      else raw), reply.headers
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read()), exc.headers

    def login(self, name: str, password: str) -> int:
        status, body, _ = self.call("POST", "/api/login", {"name": name, "password": password})
        if status == 200:
            self.csrf = body["csrf"]
        return status


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    r = Relay(tmp_path_factory.mktemp("accounts") / "data").start()
    yield r
    r.stop()


async def seed(relay: Relay, token: str) -> None:
    """Node n1 sends one reading of device d1."""
    item = {"offset": 1, "ts": 1.0, "resource": "readings",
            "body": {"readings": [{"device": "d1", "boot": 1, "seq": 1, "ts": 1.0e9, "values": {"t": 1}}]}}
    async with open_websocket_url(relay.url + "/edge", extra_headers=[
            (b"authorization", f"Bearer {token}".encode()), (b"x-edgetrio-node", b"n1")]) as ws:
        await ws.send_message(envelope("up", "batch", {"items": [item]}))
        assert json.loads(await ws.get_message())["op"] == "ack"


async def test_viewers_look_admins_change_and_cookie_writes_need_the_csrf_token(relay: Relay) -> None:
    await seed(relay, relay.add_node("n1"))
    relay.add_user("vera", "viewer", "viewer-password-1")
    relay.add_user("adam", "admin", "admin-password-1")

    anonymous = Client(relay.api_url)
    assert anonymous.call("GET", "/api/nodes")[0] == 401
    assert anonymous.login("vera", "wrong-password") == 401
    assert anonymous.login("nobody", "viewer-password-1") == 401

    viewer = Client(relay.api_url)
    assert viewer.login("vera", "viewer-password-1") == 200
    cookie = next(iter(viewer.jar))
    assert cookie.name == "edgetrio_session" and cookie.has_nonstandard_attr("HttpOnly")
    status, _, headers = viewer.call("POST", "/api/login", {"name": "vera", "password": "viewer-password-1"})
    assert "SameSite=Strict" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    assert viewer.call("GET", "/api/nodes")[1][0]["name"] == "n1"
    assert viewer.call("GET", "/api/me")[1]["role"] == "viewer"
    assert viewer.call("GET", "/api/nodes/n1/devices/d1/readings?format=csv")[0] == 200
    for method, path, body in WRITES:
        status, reply, _ = viewer.call(method, path, body)
        assert status == 403 and "viewer" in reply["error"], (method, path, status, reply)

    admin = Client(relay.api_url)
    assert admin.login("adam", "admin-password-1") == 200
    # a write from the cookie alone (what a forged cross-site request would carry) is refused
    status, reply, _ = admin.call("PATCH", "/api/nodes/n1/devices/d1/twin", {"desired": {"period": 5}}, csrf=False)
    assert status == 403 and "CSRF" in reply["error"]
    status, twin, _ = admin.call("PATCH", "/api/nodes/n1/devices/d1/twin", {"desired": {"period": 5}})
    assert status == 200 and twin["desired"]["state"] == {"period": 5}

    # an API token for scripts: no cookie, no CSRF token needed; revoked, it is refused at once
    minted = json.loads(relay.cli("user", "token", "adam", "--json").stdout)
    script = Client(relay.api_url, minted["token"])
    assert script.call("PATCH", "/api/nodes/n1/devices/d1/twin", {"desired": {"period": 6}})[0] == 200
    viewer_token = json.loads(relay.cli("user", "token", "vera", "--json").stdout)["token"]
    assert Client(relay.api_url, viewer_token).call("PATCH", "/api/fleet/twin", {"desired": {"x": 1}})[0] == 403
    relay.cli("user", "revoke", minted["id"])
    assert script.call("GET", "/api/nodes")[0] == 401
    # the operator token keeps working as the first admin's
    operator = Client(relay.api_url, json.loads((relay.data_dir / "operator.json").read_text())["token"])
    assert operator.call("GET", "/api/me")[1] == {"name": "operator", "role": "admin", "via": "token", "csrf": None}

    # a session ends when it expires, on logout, and when its account is removed
    relay.sql("UPDATE web_sessions SET expires = 0 WHERE \"user\" = 'adam'")
    assert admin.call("GET", "/api/nodes")[0] == 401
    assert admin.login("adam", "admin-password-1") == 200
    assert admin.call("POST", "/api/logout")[0] == 200
    assert admin.call("GET", "/api/nodes")[0] == 401
    relay.cli("user", "remove", "vera")
    assert viewer.call("GET", "/api/nodes")[0] == 401


async def test_a_rotated_node_token_is_refused_and_the_live_link_closed(relay: Relay) -> None:
    token = relay.add_node("n2")
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"x-edgetrio-node", b"n2")]
    async with open_websocket_url(relay.url + "/edge", extra_headers=headers) as ws:
        for _ in range(50):  # the relay has registered the session
            if any(n["name"] == "n2" and n["online"] for n in relay.json("nodes")):
                break
            await trio.sleep(0.1)
        renewed = relay.json("node", "rotate", "n2")["token"]
        with pytest.raises(ConnectionClosed), trio.fail_after(10):
            await ws.get_message()
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(relay.url + "/edge", extra_headers=headers):
            pass
    async with open_websocket_url(relay.url + "/edge", extra_headers=[
            (b"authorization", f"Bearer {renewed}".encode()), (b"x-edgetrio-node", b"n2")]):
        pass
    relay.json("node", "remove", "n2")
    assert all(n["name"] != "n2" for n in relay.json("nodes"))
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(relay.url + "/edge", extra_headers=[
                (b"authorization", f"Bearer {renewed}".encode()), (b"x-edgetrio-node", b"n2")]):
            pass
    assert relay.cli("node", "rotate", "n2", check=False).returncode != 0


def test_the_openapi_document_is_valid_and_describes_every_route_and_its_errors(relay: Relay) -> None:
    from openapi_spec_validator import validate

    from edgetrio.cloud.api import ROUTES, openapi

    status, doc, _ = Client(relay.api_url).call("GET", "/openapi.json")
    assert status == 200 and doc == json.loads(json.dumps(openapi()))
    validate(doc)  # the OpenAPI 3.0 schema, checked by a validator nobody here wrote
    for route in ROUTES:
        operation = doc["paths"][route.template][route.method.lower()]
        errors = {code: r for code, r in operation["responses"].items() if code.startswith(("4", "5"))}
        assert "401" in errors and all(
            r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            for r in errors.values()), (route.method, route.template)
    lists = doc["paths"]["/api/nodes"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert lists == {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}
