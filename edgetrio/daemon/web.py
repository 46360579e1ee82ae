"""The gateway's dashboard and API: the relay's pages (edgetrio/webui) for this gateway's own devices, served by the
daemon, so they work with the internet down. The same URLs as the relay's, with one node: this gateway.

Who may log in: the admin credential of the data dir (user `edgetrio-admin`, the password in admin.json, which also
works as a bearer token), and accounts made with `edgetrio user add NAME --role admin|viewer`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import h11
import trio

from edgetrio import accounts, web
from edgetrio.daemon import store
from edgetrio.daemon.alerts import ack_alert, list_alerts
from edgetrio.daemon.commands import CommandFailed, set_desired
from edgetrio.daemon.ingest import Watch, missing_from_model
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.rulestore import list_automations
from edgetrio.daemon.topics import Reading
from edgetrio.models import Model
from edgetrio.rules import hide_notify_secrets
from edgetrio.twin import Twin
from edgetrio.web import Body, HTTPError, Params, Principal, Result

log = logging.getLogger("edgetrio.web")
T = TypeVar("T")
HTTP_TIMEOUT = 15.0  # seconds a client may take to send a request, or idle between requests


class GatewayWeb(Watch):
    """The web side of the gateway: a `web.Site` for the shared pages, and a `Watch` that tells open pages what ingest
    stored."""

    def __init__(self, parts: Parts, admin: tuple[str, str], node: str) -> None:
        self.writer, self.link, self.roster = parts.writer, parts.link, parts.roster
        self.changes, self.commands = parts.changes, parts.commands
        self.node = node
        self.counters: Counter[str] = Counter()
        self.events = web.Events()
        self.logins = web.LoginGuard()  # bounds what login floods cost
        self.arrivals = web.Arrivals()  # bounds connections still sending their first request
        self.report: Callable[[], dict[str, int]] = dict  # what the fleet page shows of this gateway (set by the root)
        self.secure_cookies = False
        self.builtin = admin  # the data dir's admin credential: the local admin
        self.builtin_login = True

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.writer.write(lambda db: fn(db, *args))

    # -- what ingest tells (never blocks) --
    def committed(self, readings: list[Reading]) -> None:
        if not self.events.streams:
            return
        now = time.time()
        by_device: dict[str, list[dict[str, Any]]] = {}
        for r in readings:
            by_device.setdefault(r.device, []).append({"ts": r.ts if r.ts is not None else now, "values": r.values})
        for device, rows in by_device.items():
            self.events.publish({"type": "readings", "node": self.node, "device": device, "readings": rows})

    def presence(self, device: str, online: bool) -> None:
        self.events.publish({"type": "device", "node": self.node, "device": device, "online": online})

    def reported(self, device: str, twin: Twin) -> None:
        self.events.publish({"type": "twin", "node": self.node, "device": device})

    def meta(self, device: str) -> None:
        self.events.publish({"type": "device", "node": self.node, "device": device})

    # -- HTTP --
    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection; whatever happens on it ends that connection only."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)

        async def next_event() -> Any:
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(64 * 1024)))
            return event

        try:
            first = None
            with self.arrivals.first_request(web.peer_address(stream)) as admitted:
                if not admitted:
                    return
                with trio.move_on_after(HTTP_TIMEOUT):  # the first request only: a page's event stream stays open
                    first = await next_event()
            await web.serve_requests(self, partial(web.dispatch, self, ROUTES), conn, stream, first, next_event,
                                     HTTP_TIMEOUT)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError) as exc:
            log.debug("web connection ended: %r", exc)
        finally:
            await trio.aclose_forcefully(stream)

    def check_node(self, path: Params) -> None:
        if path.get("node", self.node) != self.node:
            raise HTTPError(404, f"this gateway is node {self.node!r}")

    def require_device(self, path: Params) -> str:
        self.check_node(path)
        if path["device"] not in self.roster:
            raise store.UnknownDevice(path["device"])
        return path["device"]


@asynccontextmanager
async def serve_web(site: GatewayWeb, host: str, port: int) -> AsyncIterator[str | None]:
    """Serve the dashboard within this block; yields "host:port", or None when turned off (a negative port) or when
    the port cannot be bound: the dashboard is optional, so that is logged and devices are served either way."""
    if port < 0:
        yield None
        return
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        log.warning("dashboard not served on %s:%d: %s", host, port, exc.strerror or exc)
        yield None
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, site.handle_connection, listeners)
        try:
            yield f"{host}:{listeners[0].socket.getsockname()[1]}"
        finally:
            nursery.cancel_scope.cancel()


# -- the API, as the relay's with one node ----------------------------------------------------------------------------

def _device_row(node: str, row: dict[str, Any], models: dict[str, Model | None]) -> dict[str, Any]:
    model = models.get(row["id"]) if row["model"] else None
    return {"node": node, "id": row["id"], "model": row["model"], "online": row["online"],
            "last_seen": row["last_seen"], "meta": row["meta"], "asleep_until": row.get("asleep_until"),
            "model_lacks": missing_from_model(model, row["meta"] or {})}  # what the board sends that it refuses


async def nodes(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, [{"name": site.node, "online": True, "last_seen": time.time(), "connects": 1,
                  "devices": len(site.roster.models), "queued": 0, "counters": site.report()}]


async def devices(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    site.check_node(path)
    rows = await site.run(store.list_devices)
    return 200, [_device_row(site.node, row, site.roster.models) for row in rows]


async def twin_get(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    device = site.require_device(path)
    twin: Twin = await site.run(store.get_twin, device)
    return 200, twin.as_json()


async def twin_set(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    device = site.require_device(path)
    patch, version = data.get("desired"), data.get("version")
    if not isinstance(patch, dict) or not patch:
        raise HTTPError(400, "'desired' must be a non-empty object")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise HTTPError(400, "'version' must be an integer")
    twin = await set_desired(site.writer, site.changes, site.link, device, patch, version)
    site.events.publish({"type": "twin", "node": site.node, "device": device})
    return 200, twin.as_json()


async def command(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    device = site.require_device(path)
    name, args = data.get("name"), data.get("args") or {}
    timeout = float(data.get("timeout", 10))
    if not isinstance(name, str) or not name or not isinstance(args, dict) or not 0 < timeout <= 300:
        raise HTTPError(400, "a command needs a 'name', an object 'args' and a timeout of up to 300 s")
    try:
        return 200, await site.commands.send(device, name, args, timeout)
    except CommandFailed as exc:
        raise HTTPError(504 if exc.code == "timeout" else 409, str(exc)) from None


async def readings(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    device = site.require_device(path)
    since, until, limit = web.readings_query(query)
    rows = await site.run(partial(store.query_readings, device_id=device, since=since, limit=limit, until=until))
    if query.get("format") == "csv":
        return 200, web.readings_csv(device, rows)
    return 200, rows


async def series(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    device = site.require_device(path)
    span, points = web.series_query(query)
    now = time.time()
    return 200, await site.run(accounts.series, "device = ?", [device], "COALESCE(ts, received)", now - span, now,
                               points)


async def logs(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """The device's newest log and status lines (what `edgetrio logs` shows)."""
    device = site.require_device(path)
    return 200, await site.run(partial(store.device_logs, device_id=device, limit=100))


async def rejects(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """What the gateway refused from the device, with the reason (what `edgetrio rejects` shows)."""
    device = site.require_device(path)
    rows = await site.run(partial(store.rejects, device_id=device, limit=50))
    return 200, [{k: v for k, v in r.items() if k != "payload"} for r in rows]


async def alerts(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """The gateway's alerts as the relay lists the fleet's (what `edgetrio alerts` shows)."""
    everything = query.get("all") in ("1", "true", "yes")
    rows = await site.run(partial(list_alerts, everything=everything))
    return 200, [{"node": site.node, **r} for r in rows]


async def rules(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """The gateway's rules and schedules (its own and the cloud's set) in the relay's shape, with why any is left
    out in part (what `edgetrio rules list` shows)."""
    site.check_node(path)

    def read(db: Any) -> dict[str, Any]:
        version = next(iter(db.query("SELECT version FROM rule_sets WHERE source = 'cloud'")), {"version": 0})
        return {"version": version["version"], "automations": list_automations(db)}
    found = await site.run(read)
    doc: dict[str, list[dict[str, Any]]] = {"rule": [], "schedule": []}
    problems = {}
    for a in found["automations"]:
        doc["rule" if a["kind"] == "rule" else "schedule"].append({**a["body"], "name": a["name"], "source": a["source"]})
        if a["problem"]:
            problems[a["name"]] = a["problem"]
    if who.role != "admin":
        hide_notify_secrets(doc["rule"])
    return 200, {"node": site.node, "version": found["version"], "doc": doc, "applied": found["version"],
                 "result": {"ok": True, "problems": problems}}


async def alert_ack(site: GatewayWeb, who: Principal, path: Params, query: Params, data: Body) -> Result:
    site.check_node(path)
    alert = await site.run(partial(ack_alert, alert_id=int(path["alert"]), who=who.name, now=time.time(),
                                   mirror=site.changes.mirror))
    return 200, {"node": site.node, **alert}


ROUTES: web.Routes = [
    web.Route("GET", "/api/alerts", alerts),
    web.Route("POST", "/api/nodes/{node}/alerts/{alert}/ack", alert_ack),
    web.Route("GET", "/api/nodes", nodes),
    web.Route("GET", "/api/devices", devices),
    web.Route("GET", "/api/nodes/{node}/devices", devices),
    web.Route("GET", "/api/nodes/{node}/rules", rules),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/twin", twin_get),
    web.Route("PATCH", "/api/nodes/{node}/devices/{device}/twin", twin_set),
    web.Route("POST", "/api/nodes/{node}/devices/{device}/commands", command),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/readings", readings),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/series", series),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/logs", logs),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/rejects", rejects),
    *web.ACCOUNT_ROUTES,
]
