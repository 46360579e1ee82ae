"""The operator HTTP API and dashboard of the relay, on the web side it shares with the gateway (edgetrio.web):
JSON over HTTP/1.1, OpenAPI document at /openapi.json, server-sent events on /api/stream.

The relay's operator token is the first admin's; accounts are made with `edgetrio cloud user add`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import h11
import trio

from edgetrio import rules, web
from edgetrio.cloud import rollouts, store
from edgetrio.web import Body, HTTPError, Params, Principal, Result
from edgetrio.wire import MAX_INTEGER

log = logging.getLogger("edgetrio.api")
REGISTRATION_WAIT = 10.0  # seconds `device add` waits for a linked node to take (or refuse) a device


class Relay(web.Site, Protocol):
    """What the API needs of the relay (edgetrio.cloud.relay.Relay), so the API does not import the relay."""

    sessions: dict[str, Any]  # node -> its live edge session
    command_waiters: dict[str, trio.Event]
    down_waiters: dict[str, trio.Event]  # a down message's id -> set when the edge confirms it

    def notify(self, node: str) -> None: ...

    async def linked(self, node: str) -> bool: ...

    async def close_link(self, node: str, reason: str) -> None: ...


BASE64 = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
WAVE = "([1-9][0-9]{0,5}|[1-9][0-9]?%|100%)"  # a number of boards, or a share of them


def openapi() -> dict[str, Any]:
    """The API described for clients (checked against the OpenAPI 3.0 schema in the tests)."""
    device_path = "/api/nodes/{node}/devices/{device}"
    node_param = {"name": "node", "in": "path", "required": True, "schema": {"type": "string"}}
    params = [node_param, {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}}]

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def errors(*codes: int) -> dict[str, Any]:
        reasons = {400: "Bad request (the message says what)", 401: "Not logged in, or an unknown token",
                   403: "A viewer, or a cookie write without the CSRF token", 404: "Unknown node or device",
                   409: "Version conflict, or the node is offline", 504: "No result within the timeout"}
        return {str(c): ok(ref("Error"), reasons[c]) for c in (401, 403, *codes)}

    def body(properties: dict[str, Any], required: list[str], closed: bool = False) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": properties, "required": required,
            **({"additionalProperties": False} if closed else {})}}}}

    string, number, integer, obj = {"type": "string"}, {"type": "number"}, {"type": "integer"}, {"type": "object"}
    changes = {"type": "object", "minProperties": 1}  # a change changes something: {} is refused (400)
    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 5000}},
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}]
    nullable_number = {"type": "number", "nullable": True}
    schemas = {
        "Error": {"type": "object", "properties": {"error": string}, "required": ["error"]},
        "Node": {"type": "object", "properties": {"name": string, "online": {"type": "boolean"},
                                                  "last_seen": nullable_number, "connects": integer,
                                                  "devices": integer, "queued": integer,
                                                  # host:port of the relay replica holding its link, if any
                                                  "replica": {**string, "nullable": True},
                                                  "counters": {"type": "object", "nullable": True,
                                                               "additionalProperties": integer}}},
        "Device": {"type": "object", "properties": {"node": string, "id": string, "model": {**string, "nullable": True},
                                                    "online": {"type": "boolean"}, "last_seen": nullable_number,
                                                    "meta": {**obj, "nullable": True},
                                                    "asleep_until": nullable_number}},
        "Twin": {"type": "object", "properties": {
            "desired": {"type": "object", "properties": {"state": obj, "version": integer}},
            "reported": {"type": "object", "properties": {"state": obj, "version": integer}}, "delta": obj}},
        "Event": {"type": "object", "properties": {"id": integer, "ts": number, "kind": string, "body": {}}},
        "Reading": {"type": "object", "properties": {"boot": integer, "seq": integer, "ts": number, "values": obj}},
        "Series": {"type": "object", "properties": {
            "since": number, "until": number, "bucket": number, "ts": {"type": "array", "items": number},
            "count": {"type": "array", "items": integer},
            "values": {"type": "object", "additionalProperties": {"type": "array", "items": nullable_number}}}},
        "Alert": {"type": "object", "properties": {
            "node": string, "id": integer, "rule": string, "device": string,
            "severity": {"type": "string", "enum": ["info", "warning", "critical"]},
            "state": {"type": "string", "enum": ["pending", "firing", "resolved"]}, "values": obj,
            "started": nullable_number, "fired": nullable_number, "resolved": nullable_number,
            "acked": nullable_number, "acked_by": {**string, "nullable": True}}},
        "RuleSet": {"type": "object", "properties": {
            "node": string, "version": integer, "doc": obj, "applied": {**integer, "nullable": True},
            "result": {**obj, "nullable": True}}},
        "Me": {"type": "object", "properties": {"name": string, "role": {"type": "string", "enum": ["admin", "viewer"]},
                                                "via": string, "csrf": {**string, "nullable": True}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgetrio relay operator API", "version": "1"},
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": web.SESSION_COOKIE}}},
        "security": [{"bearer": []}, {"session": []}],
        "paths": {
            "/api/login": {"post": {
                "summary": "Log in; sets the session cookie and returns the CSRF token for writes", "security": [],
                "requestBody": body({"name": string, "password": string}, ["name", "password"]),
                "responses": {"200": ok(ref("Me")), "400": ok(ref("Error"), "Bad request"),
                              "401": ok(ref("Error"), "Wrong name or password"),
                              "415": ok(ref("Error"), "Not a JSON body"),
                              "429": ok(ref("Error"), "Too many failed logins (Retry-After)"),
                              "503": ok(ref("Error"), "Too many logins being checked (Retry-After)")}}},
            "/api/logout": {"post": {"summary": "End the session", "responses": {"200": ok(obj), **errors()}}},
            "/api/me": {"get": {"summary": "Who is asking", "responses": {"200": ok(ref("Me")), **errors()}}},
            "/api/stream": {"get": {
                "summary": "Server-sent events (readings, twin, device, node) as the relay stores them",
                "parameters": [{"name": n, "in": "query", "schema": string} for n in ("node", "device", "kinds")],
                "responses": {"200": {"description": "text/event-stream",
                                      "content": {"text/event-stream": {"schema": string}}}, **errors()}}},
            "/api/nodes": {"get": {"summary": "Nodes with online state, last seen, devices and queued messages",
                                   "responses": {"200": ok({"type": "array", "items": ref("Node")}), **errors()}}},
            "/api/nodes/{node}": {"parameters": [node_param], "delete": {
                "summary": "Forget a node (token, devices, queue, readings) and close its link",
                "responses": {"200": ok(obj), **errors(404)}}},
            "/api/nodes/{node}/token": {"parameters": [node_param], "post": {
                "summary": "A new token for the node; the old one is refused and its link closed at once",
                "responses": {"200": ok({"type": "object", "properties": {"node": string, "token": string}}),
                              **errors(404)}}},
            "/api/devices": {"get": {"summary": "Devices of all nodes, a page at a time (x-total-count: how many)",
                                     "parameters": page,
                                     "responses": {"200": ok({"type": "array", "items": ref("Device")}),
                                                   **errors(400)}}},
            "/api/fleet/twin": {"patch": {
                "summary": "One desired change for every device (or those of `node`, or named `device`) that has those "
                           "settings, one transaction; the others are skipped, each with why",
                "requestBody": body({"desired": changes, "node": {"type": "string", "nullable": True},
                                     "device": {"type": "string", "nullable": True}}, ["desired"]),
                "responses": {"200": ok({"type": "object", "properties": {
                    "devices": integer, "nodes": integer,
                    "skipped": {"type": "object", "additionalProperties": string}}}),
                              **errors(400, 404)}}},
            "/api/alerts": {"get": {
                "summary": "Alerts of the fleet, newest first: open ones and resolved ones not acknowledged (all=1: all)",
                "parameters": [{"name": "all", "in": "query", "schema": string},
                               {"name": "node", "in": "query", "schema": string}],
                "responses": {"200": ok({"type": "array", "items": ref("Alert")}), **errors()}}},
            "/api/nodes/{node}/alerts/{alert}/ack": {
                "parameters": [node_param, {"name": "alert", "in": "path", "required": True,
                                            "schema": {"type": "integer"}}],
                "post": {"summary": "Acknowledge an alert; the edge, which holds it, is told through the down channel",
                         "responses": {"200": ok({"type": "object", "properties": {
                             "node": string, "id": integer, "acked_by": string}}), **errors(400, 404)}}},
            "/api/rollouts": {
                "get": {"summary": "The newest 100 firmware rollouts, with their counts (no boards)",
                        "responses": {"200": ok({"type": "array", "items": obj}), **errors()}},
                "post": {"summary": "Roll a firmware bundle out to the boards `select` names, in waves; halts by itself "
                                    "past `max_failures`, moves to the next wave when `success` of this one confirmed",
                         "requestBody": body({
                             "files": {"type": "object", "minProperties": 3, "maxProperties": 200,
                                       "required": ["node.mpy", "ota.mpy", "trial.mpy"],
                                       "additionalProperties": {"type": "string", "pattern": BASE64}},
                             "select": {"type": "object", "minProperties": 1, "additionalProperties": False,
                                        "properties": {k: {"type": "string", "minLength": 1}
                                                       for k in ("node", "device", "model")}},
                             "waves": {"type": "string", "pattern": f"^{WAVE}(,{WAVE}){{0,19}}$"},
                             "success": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
                             "max_failures": {"type": "integer", "minimum": 0, "maximum": 1000000},
                             "timeout": {"type": "number", "minimum": 60, "maximum": 604800},
                             "confirm_s": {"type": "integer", "minimum": 30, "maximum": 86400}}, ["files", "select"],
                             closed=True),
                         "responses": {"201": ok(obj, "Created; the first wave is queued"), **errors(400, 404, 409)}}},
            "/api/rollouts/{rollout}": {
                "parameters": [{"name": "rollout", "in": "path", "required": True, "schema": string}],
                "get": {"summary": "A rollout and each of its boards' state",
                        "responses": {"200": ok(obj), **errors(404)}}},
            "/api/rollouts/{rollout}/{action}": {
                "parameters": [{"name": "rollout", "in": "path", "required": True, "schema": string},
                               {"name": "action", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": ["pause", "resume", "abort"]}}],
                "post": {"summary": "Pause (no new wave starts), resume, or abort (boards not updated yet are left "
                                    "alone; those in progress are cancelled at their gateway; with rollback, the "
                                    "confirmed ones go back to the firmware they ran before)",
                         "requestBody": {"required": False, "content": {"application/json": {"schema": {
                             "type": "object", "properties": {"rollback": {"type": "boolean"}}}}}},
                         "responses": {"200": ok(obj), **errors(400, 404)}}},
            "/api/fleet/rules": {"put": {
                "summary": "The same rule set for every node (each its own next version)",
                "requestBody": body({"doc": obj}, ["doc"]),
                "responses": {"200": ok({"type": "array", "items": obj}), **errors(400)}}},
            "/api/nodes/{node}/rules": {
                "parameters": [node_param],
                "get": {"summary": "The node's rule set, its version, and what the edge said when it applied it",
                        "responses": {"200": ok(ref("RuleSet")), **errors(404)}},
                "put": {"summary": "Replace the node's rule set (rules and schedules of a rule file, as JSON); sent "
                                   "down as the next version, applied when the edge is reachable",
                        "requestBody": body({"doc": obj}, ["doc"]),
                        "responses": {"200": ok({"type": "object", "properties": {
                            "node": string, "version": integer, "rules": integer, "schedules": integer}}),
                            **errors(400, 404)}}},
            "/api/nodes/{node}/devices": {
                "parameters": [node_param],
                "get": {"summary": "Devices of a node, a page at a time (x-total-count: how many)", "parameters": page,
                        "responses": {"200": ok({"type": "array", "items": ref("Device")}), **errors(400, 404)}},
                "post": {"summary": "Register a device on the node; the credential is returned once. A linked node's "
                                    "answer is awaited a moment: registered, or refused (409: a model it lacks); "
                                    "an offline node's comes when it connects (queued)",
                         "requestBody": body({"id": string, "model": string}, ["id"]),
                         "responses": {"201": ok({"type": "object", "properties": {
                             "id": string, "username": string, "password": string,
                             "state": {"type": "string", "enum": ["registered", "queued"]}}}),
                             **errors(400, 404, 409)}}},
            f"{device_path}/twin": {
                "parameters": params,
                "get": {"summary": "Twin replica", "responses": {"200": ok(ref("Twin")), **errors(404)}},
                "patch": {"summary": "Change desired state (null removes a key); a stale version is refused (409)",
                          "requestBody": body({"desired": changes, "version": integer}, ["desired"]),
                          "responses": {"200": ok(ref("Twin")), **errors(400, 404, 409)}}},
            f"{device_path}/commands": {
                "parameters": params,
                "post": {"summary": "Run a command on the device and wait for its result",
                         "requestBody": body({"name": {"type": "string", "minLength": 1}, "args": obj,
                                              "timeout": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                                          "maximum": 300}},
                                             ["name"]),
                         "responses": {"200": ok({"type": "object", "properties": {
                             "id": string, "ok": {"type": "boolean"}, "value": {}, "error": string}}),
                             **errors(400, 404, 409, 504)}}},
            f"{device_path}/readings": {
                "parameters": [*params, {"name": "since", "in": "query", "schema": string,
                                         "description": "epoch seconds, an ISO time, or an age such as 10m, 2h, 1d"},
                               {"name": "until", "in": "query", "schema": string,
                                "description": "only readings before this time (the next page of older ones)"},
                               {"name": "limit", "in": "query", "schema": {
                                   "type": "integer", "minimum": 1, "maximum": web.READINGS_LIMIT},
                                "description": f"the newest N (default and most: {web.READINGS_LIMIT})"},
                               {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}}],
                "get": {"summary": "Readings, oldest first (CSV with format=csv)",
                        "responses": {"200": {"description": "OK", "content": {
                            "application/json": {"schema": {"type": "array", "items": ref("Reading")}},
                            "text/csv": {"schema": string}}}, **errors(400, 404)}}},
            f"{device_path}/logs": {"parameters": params, "get": {
                "summary": "The device's newest log and status lines, as its gateway sent them up",
                "responses": {"200": ok({"type": "array", "items": ref("Event")}), **errors(404)}}},
            f"{device_path}/rejects": {"parameters": params, "get": {
                "summary": "What the device's gateway refused from it, with the reason",
                "responses": {"200": ok({"type": "array", "items": {"type": "object", "properties": {
                    "received": number, "reason": string, "detail": string}}}), **errors(404)}}},
            f"{device_path}/series": {
                "parameters": [*params, {"name": "range", "in": "query",
                                         "schema": {"type": "string", "enum": list(web.RANGES)}},
                               {"name": "points", "in": "query", "schema": {"type": "integer", "minimum": 10,
                                                                            "maximum": 5000}}],
                "get": {"summary": "Readings over a range averaged into at most `points` buckets per resource",
                        "responses": {"200": ok(ref("Series")), **errors(400, 404)}}},
        },
    }


async def handle_http(relay: Relay, conn: h11.Connection, stream: trio.abc.Stream, first: Any,
                      next_event: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> None:
    await web.serve_requests(relay, lambda request, body: route(relay, request, body), conn, stream, first,
                             next_event, timeout)


async def route(relay: Relay, request: h11.Request, body: bytes) -> Result:
    path = request.target.decode("latin-1").split("?", 1)[0]
    method = request.method.decode()
    if method == "GET" and path == "/openapi.json":
        return 200, openapi()
    if method == "GET" and path == "/healthz":  # for load balancers and probes: no token, nothing revealed
        with trio.move_on_after(5):
            try:
                await relay.run(lambda db: db.execute("SELECT 1").fetchone())
            except web.Unavailable as exc:  # the balancer sends new links to another replica meanwhile
                # no token here: the database's address and the error stay in the relay's log
                raise HTTPError(503, "the store does not answer") from exc
            return 200, {"ok": True, "store": "ok"}
        raise HTTPError(503, "the store did not answer within 5 s")
    return await web.dispatch(relay, ROUTES, request, body)


async def nodes(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, await relay.run(store.list_nodes)


DEVICES_PAGE = 500  # devices in one answer unless `limit` asks otherwise: a page that lists 50,000 rows takes a minute


async def devices(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """A page of devices (`limit` 1-5000, default 500; `offset`); the page's headers say the total."""
    limit, offset = query.get("limit", str(DEVICES_PAGE)), query.get("offset", "0")
    if not (limit.isdigit() and 1 <= int(limit) <= 5000 and offset.isdigit() and int(offset) <= MAX_INTEGER):
        raise web.HTTPError(400, "limit: a whole number from 1 to 5000; offset: a whole number")
    node = path.get("node") or query.get("node")
    rows = await relay.run(store.list_devices, node, int(limit), int(offset))
    total = await relay.run(store.count_devices, node)
    return 200, web.Reply(200, json.dumps(rows).encode(), headers=[("x-total-count", str(total))])


async def device_add(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    device, model = data.get("id"), data.get("model")
    if not isinstance(device, str):
        raise HTTPError(400, "'id' must be a device id (a string)")
    if model is not None and not isinstance(model, str):  # an object here once reached SQLite: a 500
        raise HTTPError(400, "'model' must be the name of a model the gateway has (a string), or left out")
    node = path["node"]
    secret, message = await relay.run(store.register_device, node, device, data.get("model"))
    answered = relay.down_waiters[message] = trio.Event()
    try:
        relay.notify(node)
        if await relay.linked(node):  # the node's answer comes in a moment (a model it lacks is refused)
            with trio.move_on_after(REGISTRATION_WAIT):
                while not answered.is_set():
                    with trio.move_on_after(1):  # the hint of another replica may be missed: look in the store too
                        await answered.wait()
                    if not answered.is_set() and await relay.run(store.down_confirmed, node, message):
                        answered.set()
    finally:
        relay.down_waiters.pop(message, None)
    refused = await relay.run(store.registration_refused, node, device) if answered.is_set() else None
    if refused:
        raise HTTPError(409, refused)
    return 201, {"id": device, "username": device, "password": secret,
                 "state": "registered" if answered.is_set() else "queued"}


async def twin_get(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, await relay.run(store.get_twin, path["node"], path["device"])


async def twin_set(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    patch, version = data.get("desired"), data.get("version")
    if not isinstance(patch, dict) or not patch:
        raise HTTPError(400, "'desired' must be a non-empty object")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise HTTPError(400, "'version' must be an integer")
    twin = await relay.run(store.set_twin, path["node"], path["device"], patch, version)
    relay.notify(path["node"])
    return 200, twin


async def fleet_twin(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                     ) -> tuple[int, Any]:
    patch = data.get("desired")
    if not isinstance(patch, dict) or not patch:
        raise HTTPError(400, "'desired' must be a non-empty object")
    node, device = data.get("node"), data.get("device")
    if not isinstance(node, str | None) or not isinstance(device, str | None):
        raise HTTPError(400, "'node' and 'device' must be strings when given (or null)")
    done = await relay.run(store.set_twin_fleet, patch, node, device)
    for name in list(relay.sessions):
        relay.notify(name)  # each session sends only what is queued for it
    return 200, done


async def rules_get(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    found = await relay.run(store.get_rules, path["node"])
    if who.role != "admin":
        rules.hide_notify_secrets(found["doc"].get("rule", []))
    return 200, found


def checked_rule_set(data: Body) -> dict[str, Any]:
    """The rule file's document in the body, checked as far as it can be without the edge's devices."""
    doc = data.get("doc")
    if not isinstance(doc, dict):
        raise HTTPError(400, "'doc' must be a rule file's document: {\"rule\": [...], \"schedule\": [...]}")
    try:
        doc = {"rule": doc.get("rule", []), "schedule": doc.get("schedule", [])}
        parsed = rules.parse_document(doc)[0]
        rules.check_notify_urls(parsed)
        problem = rules.budget_problem(r.body for r in parsed)
        if problem:  # the edge would refuse it: say so now
            raise rules.RuleError(f"the set has {problem}")
    except rules.RuleError as exc:
        raise HTTPError(400, str(exc)) from exc
    return doc


async def rules_set(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    doc = await trio.to_thread.run_sync(checked_rule_set, data)  # the first check imports apprise: not on the loop
    done = await relay.run(store.set_rules, path["node"], doc)
    relay.notify(path["node"])
    return 200, done


async def fleet_rules(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    doc = await trio.to_thread.run_sync(checked_rule_set, data)
    nodes = [n["name"] for n in await relay.run(store.list_nodes)]
    done = [await relay.run(store.set_rules, node, doc) for node in nodes]
    for node in nodes:
        relay.notify(node)
    return 200, done


async def alerts(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    everything = query.get("all") in ("1", "true", "yes")
    return 200, await relay.run(store.list_alerts, everything, query.get("node"))


async def alert_ack(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    alert = path["alert"]
    if not alert.isdigit() or int(alert) > MAX_INTEGER:  # a 23-digit id once reached SQLite: OverflowError, a 500
        raise HTTPError(400, "an alert id is a whole number (see GET /api/alerts)")
    alert_id = int(alert)
    done = await relay.run(store.ack_alert, path["node"], alert_id, who.name)
    relay.notify(path["node"])
    return 200, done


async def command(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """Run a command on a device through its node's link and wait for the result (504 when none comes)."""
    name, args = data.get("name"), data.get("args") or {}
    timeout = float(data.get("timeout", 10))
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        raise HTTPError(400, "a command needs a 'name' and an object 'args'")
    node = path["node"]
    if not await relay.linked(node):
        # commands are bound in time, unlike desired state: refuse rather than run it whenever the edge returns
        await relay.run(store.require_node, node)
        raise HTTPError(409, f"node {node!r} is offline")
    cmd_id = await relay.run(store.start_command, node, path["device"], name, args, timeout)
    waiter = relay.command_waiters[cmd_id] = trio.Event()
    relay.notify(node)
    try:
        with trio.move_on_after(timeout + 5):  # the edge gives the device `timeout`; allow for the round trips
            while (result := await relay.run(store.command_outcome, cmd_id)) is None:
                with trio.move_on_after(1):  # a hint from another replica may be missed: the store says it anyway
                    await waiter.wait()
                relay.command_waiters[cmd_id] = waiter = trio.Event()
            if "result" in result:
                return 200, result["result"]
            code = 504 if result.get("code") == "timeout" else 409
            raise HTTPError(code, str(result.get("error")))
    finally:
        relay.command_waiters.pop(cmd_id, None)
    raise HTTPError(504, f"no result from node {node!r} within {timeout:g} s (and 5 s more for the link)")


async def readings(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    since, until, limit = web.readings_query(query)
    rows = await relay.run(store.query_readings, path["node"], path["device"], since, limit, until)
    if query.get("format") == "csv":
        return 200, web.readings_csv(path["device"], rows)
    return 200, rows


async def series(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """A device's readings over a range, downsampled on the relay to at most `points` averages per resource."""
    span, points = web.series_query(query)
    now = time.time()
    return 200, await relay.run(store.series, path["node"], path["device"], now - span, now, points)


async def node_remove(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                      ) -> tuple[int, Any]:
    await relay.run(store.remove_node, path["node"])
    await relay.close_link(path["node"], "node removed")
    log.info("node removed node=%s by=%s", path["node"], who.name)
    return 200, {"node": path["node"], "removed": True}


async def node_rotate(relay: Relay, who: Principal, path: Params, query: Params, data: Body
                      ) -> tuple[int, Any]:
    token = await relay.run(store.rotate_node, path["node"])
    await relay.close_link(path["node"], "token rotated")  # the old token is refused from now on, its link too
    log.info("node token rotated node=%s by=%s", path["node"], who.name)
    return 200, {"node": path["node"], "token": token}


async def logs(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """The device's newest log and status lines and firmware update steps, as its gateway sent them up."""
    return 200, await relay.run(store.device_events, path["node"], path["device"], ("log", "status", "ota"), 100)


async def rejects(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """What the device's gateway refused from it, with the reason."""
    rows = await relay.run(store.device_events, path["node"], path["device"], ("reject",), 50)
    return 200, [{"received": r["ts"], "reason": r["body"].get("reason"), "detail": r["body"].get("detail")}
                 for r in rows]


async def rollout_create(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    """A staged rollout of a bundle (its files' bytes in base64) to the boards a selector names."""
    files = data.get("files")
    if not isinstance(files, dict) or not files or len(files) > 200:
        raise HTTPError(400, "'files': the bundle's .mpy files, an object of name -> base64 bytes")
    try:
        contents = {str(name): base64.b64decode(str(value), validate=True) for name, value in files.items()}
    except binascii.Error:
        raise HTTPError(400, "'files': each value is the file's bytes in base64") from None
    selector = data.get("select")
    if not isinstance(selector, dict) or not all(isinstance(v, str) for v in selector.values()):
        raise HTTPError(400, "'select': an object of node, device or model -> name")
    waves = data.get("waves", "1,10%,100%")
    if not isinstance(waves, str):
        raise HTTPError(400, "'waves' must be a string, e.g. \"1,10%,100%\"")
    unknown = set(data) - {"files", "select", "waves", "success", "max_failures", "timeout", "confirm_s"}
    if unknown:
        raise HTTPError(400, f"unknown field {sorted(unknown)[0][:40]!r}")
    numbers: dict[str, float] = {}
    for key, default, whole in (("success", 1.0, False), ("max_failures", 0, True), ("timeout", 1800, False),
                                ("confirm_s", 300, True)):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
            raise HTTPError(400, f"{key!r} must be {'a whole number' if whole else 'a number'}")
        if not -1e9 < value < 1e9:  # a number no setting takes (and one a float cannot hold)
            raise HTTPError(400, f"{key!r} is out of range")
        numbers[key] = value
    try:
        parsed = rollouts.parse_waves(waves)
    except rollouts.RolloutError as exc:
        raise HTTPError(400, f"'waves': {exc}") from None
    try:
        created = await relay.run(rollouts.create, contents, {str(k): v for k, v in selector.items()}, parsed,
                                  float(numbers["success"]), int(numbers["max_failures"]), float(numbers["timeout"]),
                                  int(numbers["confirm_s"]), who.name, time.time())
    except rollouts.BoardsBusy as exc:
        raise HTTPError(409, str(exc)) from None
    log.info("rollout %s created by=%s bundle=%s boards=%d", created["id"], who.name, created["bundle"][:12],
             created["total"])
    for node in (await relay.run(rollouts.drive, time.time()))[0]:  # the first wave starts now
        relay.notify(node)
    return 201, await relay.run(rollouts.view, created["id"])


async def rollout_list(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, await relay.run(rollouts.list_rollouts)


async def rollout_get(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    return 200, await relay.run(rollouts.view, path["rollout"])


async def rollout_action(relay: Relay, who: Principal, path: Params, query: Params, data: Body) -> Result:
    rollback = data.get("rollback", False)
    if not isinstance(rollback, bool):
        raise HTTPError(400, "'rollback' must be true or false")
    done, nodes = await relay.run(rollouts.set_state, path["rollout"], path["action"], time.time(), rollback)
    log.info("rollout %s %s by=%s", path["rollout"], path["action"], who.name)
    for node in nodes:
        relay.notify(node)
    return 200, done


ROUTES: web.Routes = [
    web.Route("GET", "/api/nodes", nodes),
    web.Route("GET", "/api/devices", devices),
    web.Route("PATCH", "/api/fleet/twin", fleet_twin),
    web.Route("PUT", "/api/fleet/rules", fleet_rules),
    web.Route("GET", "/api/alerts", alerts),
    web.Route("POST", "/api/nodes/{node}/alerts/{alert}/ack", alert_ack),
    web.Route("GET", "/api/nodes/{node}/rules", rules_get),
    web.Route("PUT", "/api/nodes/{node}/rules", rules_set),
    web.Route("GET", "/api/nodes/{node}/devices", devices),
    web.Route("POST", "/api/nodes/{node}/devices", device_add),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/twin", twin_get),
    web.Route("PATCH", "/api/nodes/{node}/devices/{device}/twin", twin_set),
    web.Route("POST", "/api/nodes/{node}/devices/{device}/commands", command),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/readings", readings),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/series", series),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/logs", logs),
    web.Route("GET", "/api/nodes/{node}/devices/{device}/rejects", rejects),
    web.Route("DELETE", "/api/nodes/{node}", node_remove),
    web.Route("GET", "/api/rollouts", rollout_list),
    web.Route("POST", "/api/rollouts", rollout_create),
    web.Route("GET", "/api/rollouts/{rollout}", rollout_get),
    web.Route("POST", "/api/rollouts/{rollout}/{action}", rollout_action),
    web.Route("POST", "/api/nodes/{node}/token", node_rotate),
    *web.ACCOUNT_ROUTES,
]
