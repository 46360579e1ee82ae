"""Export: copy committed readings to other systems (an HTTP webhook, an external MQTT broker), each sink with its
own durable cursor in the store, so it resumes where it stopped and loses nothing.

A sink reads the readings table after its cursor in commit order (rowid), sends a batch, and only then moves its
cursor: delivery is at least once (a batch sent just before a crash is sent again; receivers can key on device, boot
and seq). A sink that is down is retried with backoff; it never holds up ingest, which only wakes it.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import trio
from sqlite_utils import Database

from edgetrio.daemon.config import Sink
from edgetrio.daemon.edgehub import backoff_delays
from edgetrio.daemon.ingest import Watch
from edgetrio.daemon.topics import Reading
from edgetrio.writer import Writer

if TYPE_CHECKING:  # paho is imported where a client is made: the daemon seldom needs one (0.9 MB)
    import paho.mqtt.client as mqtt

log = logging.getLogger("edgetrio.export")
SEND_TIMEOUT = 15.0  # seconds one batch may take to be taken


class SinkDown(Exception):
    """The sink did not take the batch; the message says why (one line)."""


# -- the store's side ------------------------------------------------------------------------------------------------

def cursor(db: Database, name: str, start: str, select: str = "all") -> int:
    """The sink's cursor; a new sink starts after the newest reading ("now") or before the oldest ("all"). A sink of
    what rules export reads its queue from the start."""
    if select == "rules":
        row = next(iter(db.query("SELECT position FROM export_cursors WHERE name = ?", [name])), None)
        if row is None:
            db.table("export_cursors").insert({"name": name, "position": 0, "sent": 0})
            return 0
        return int(row["position"])
    row = next(iter(db.query("SELECT position FROM export_cursors WHERE name = ?", [name])), None)
    newest = next(iter(db.query("SELECT COALESCE(MAX(rowid), 0) AS n FROM readings")))["n"]
    if row is None:
        position = newest if start == "now" else 0
        db.table("export_cursors").insert({"name": name, "position": position, "sent": 0})
        return int(position)
    # every reading was deleted and numbering began again below the cursor: what is there now is new
    return int(row["position"]) if row["position"] <= newest else 0


def batch_after(db: Database, position: int, limit: int) -> list[dict[str, Any]]:
    rows = db.query("SELECT rowid, device, boot, seq, ts, received, data FROM readings WHERE rowid > ? "
                    "AND data IS NOT NULL ORDER BY rowid LIMIT ?", [position, limit])
    return list(rows)


def queued_after(db: Database, sink: str, position: int, limit: int) -> list[dict[str, Any]]:
    """What rules exported to the sink after its cursor, as readings (with the rule and the alert's state)."""
    rows = db.query("SELECT id, body FROM export_queue WHERE sink = ? AND id > ? ORDER BY id LIMIT ?",
                    [sink, position, limit])
    return [{"rowid": r["id"], **json.loads(r["body"])} for r in rows]


def move_cursor(db: Database, name: str, position: int, sent: int) -> None:
    db.execute("UPDATE export_cursors SET position = ?, sent = sent + ? WHERE name = ?", [position, sent, name])


def as_reading(row: dict[str, Any]) -> dict[str, Any]:
    out = {"device": row["device"], "boot": row["boot"], "seq": row["seq"], "ts": row["ts"] or row["received"],
           "values": json.loads(row["data"])}
    if row["ts"] is None:  # the board's clock could not be trusted: its arrival, marked
        out["ts_arrival"] = True
    return out


def _without_rowid(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "rowid"}


# -- senders ---------------------------------------------------------------------------------------------------------

class Webhook:
    """POSTs JSON batches: {"node", "sink", "readings": [...]}; any 2xx answer means taken."""

    def __init__(self, sink: Sink, node: str) -> None:
        self.sink, self.node = sink, node

    def send(self, readings: list[dict[str, Any]]) -> None:
        """Publish readings to the sink's broker (QoS 1) and wait for each acknowledgement; raises SinkDown if it
        cannot."""
        body = json.dumps({"node": self.node, "sink": self.sink.name, "readings": readings}).encode()
        request = urllib.request.Request(self.sink.url, data=body, method="POST", headers={
            "content-type": "application/json", "user-agent": "edgetrio-export", **dict(self.sink.headers)})
        try:
            with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise SinkDown(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:  # a receiver that
            raise SinkDown(str(getattr(exc, "reason", exc)) or type(exc).__name__) from None  # answers garbage too

    def close(self) -> None:
        pass


class MqttBroker:
    """Publishes each reading as JSON to the sink's topic on an external broker (paho), waiting for the broker's
    acknowledgement (QoS 1 or 2) before the batch counts as taken."""

    def __init__(self, sink: Sink, node: str) -> None:
        self.sink, self.node = sink, node
        self.client: mqtt.Client | None = None

    def _connect(self) -> mqtt.Client:
        import paho.mqtt.client as mqtt

        url = urlsplit(self.sink.url)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgetrio-{self.node}-{self.sink.name}"[:64])
        if url.username:
            client.username_pw_set(unquote(url.username), unquote(url.password or ""))
        if url.scheme == "mqtts":
            client.tls_set_context(ssl.create_default_context())
        answer: queue.Queue[str | None] = queue.Queue()
        client.on_connect = lambda _c, _u, _f, reason, _p: answer.put(str(reason) if reason.is_failure else None)
        try:
            client.connect(url.hostname or "", url.port or (8883 if url.scheme == "mqtts" else 1883), keepalive=30)
        except (OSError, ValueError) as exc:
            raise SinkDown(f"cannot reach {url.hostname}:{url.port or 1883}: {exc}") from None
        client.loop_start()
        try:
            refused = answer.get(timeout=SEND_TIMEOUT)
        except queue.Empty:
            refused = "no answer to CONNECT"
        if refused:
            client.loop_stop()
            client.disconnect()
            raise SinkDown(f"the broker refused the connection: {refused}")
        return client

    def send(self, readings: list[dict[str, Any]]) -> None:
        import paho.mqtt.client as mqtt

        if self.client is None or not self.client.is_connected():
            self.close()
            self.client = self._connect()
        deadline = time.monotonic() + SEND_TIMEOUT
        sent = []
        for reading in readings:
            topic = self.sink.topic.replace("{device}", reading["device"]).replace("{node}", self.node)
            info = self.client.publish(topic, json.dumps(reading), qos=self.sink.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self.close()
                raise SinkDown(f"publish failed: {mqtt.error_string(info.rc)}")
            sent.append(info)
        for info in sent:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                self.close()
                raise SinkDown(f"publish failed: {exc}") from None
            if not info.is_published():
                self.close()
                raise SinkDown(f"the broker did not acknowledge within {SEND_TIMEOUT:g} s")

    def close(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
            self.client = None


# -- the daemon's side -----------------------------------------------------------------------------------------------

class Export(Watch):
    """The configured sinks, one task each; ingest wakes them after each commit."""

    def __init__(self, sinks: list[Sink], writer: Writer, node: str) -> None:
        self.sinks = sinks
        self.writer = writer
        self.node = node
        self._wake = {s.name: trio.Event() for s in sinks}
        self.states: dict[str, dict[str, Any]] = {s.name: {"state": "starting", "sent": 0, "error": None}
                                                  for s in sinks}

    def committed(self, readings: list[Reading]) -> None:
        self.wake()

    def wake(self) -> None:
        """Readings were committed, or rules exported some: the sinks look."""
        for event in self._wake.values():
            event.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for sink in self.sinks:
                nursery.start_soon(self._run_sink, sink)
            task_status.started()

    async def _run_sink(self, sink: Sink) -> None:
        state = self.states[sink.name]
        sender: Webhook | MqttBroker = Webhook(sink, self.node) if sink.kind == "webhook" else MqttBroker(sink, self.node)
        position = await self.writer.write(partial(cursor, name=sink.name, start=sink.start, select=sink.select))
        fetch: Callable[..., list[dict[str, Any]]]
        if sink.select == "rules":
            fetch = partial(queued_after, sink=sink.name)
            reading = _without_rowid
        else:
            fetch, reading = batch_after, as_reading
        delays = backoff_delays(1.0, 60.0)
        try:
            while True:
                self._wake[sink.name] = trio.Event()
                rows = await self.writer.read(partial(fetch, position=position, limit=sink.batch))  # no commit
                if not rows:
                    state["state"] = "idle" if state["state"] != "down" else "down"
                    with trio.move_on_after(5):
                        await self._wake[sink.name].wait()
                    continue
                readings = [reading(r) for r in rows]
                try:
                    await trio.to_thread.run_sync(sender.send, readings, abandon_on_cancel=True)
                except SinkDown as exc:
                    if state["state"] != "down":
                        log.warning("export %s is down: %s (readings wait for it)", sink.name, exc)
                    state.update(state="down", error=str(exc), since=state.get("since") or time.time())
                    await trio.sleep(next(delays))
                    continue
                if state["state"] == "down":
                    log.info("export %s is back", sink.name)
                delays = backoff_delays(1.0, 60.0)
                position = rows[-1]["rowid"]
                await self.writer.write(partial(move_cursor, name=sink.name, position=position, sent=len(rows)))
                state.update(state="sending", error=None, since=None, sent=state["sent"] + len(rows))
        finally:
            sender.close()
