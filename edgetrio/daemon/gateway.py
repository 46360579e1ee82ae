"""The gateway daemon's root: opens the store, the broker and the cloud link, and composes the components.

One trio process: broker -> ingest (classify -> group commit -> ack) -> store -> outbox -> edge link, with the
control server answering the CLI and local apps, and chores (counters, retention) beside them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from sqlite_utils import Database

from edgetrio.daemon import store
from edgetrio.daemon.alerts import forget_pending, mirror_open_alerts
from edgetrio.daemon.automation import Automation
from edgetrio.daemon.broker import BrokerLink, Credentials, open_broker
from edgetrio.daemon.changes import StateChanges, no_mirror
from edgetrio.daemon.commands import Commands
from edgetrio.daemon.config import (
    RUN_FILE,
    DaemonConfig,
    DaemonError,
    admin_credential,
    lock_data_dir,
    parse_sinks,
    write_run_file,
)
from edgetrio.daemon.control import ControlServer
from edgetrio.daemon.devices import SerialDevice
from edgetrio.daemon.down import Down, open_down
from edgetrio.daemon.edgehub import EdgeHub, outbox_mirror
from edgetrio.daemon.export import Export
from edgetrio.daemon.homeassistant import HomeAssistant
from edgetrio.daemon.ingest import Ingest
from edgetrio.daemon.metrics import REGISTRY, GatewayCollector
from edgetrio.daemon.ota import Updates
from edgetrio.daemon.parts import Parts
from edgetrio.daemon.roster import Roster
from edgetrio.daemon.service import feed_watchdog, notify
from edgetrio.daemon.supervisor import Supervisor
from edgetrio.daemon.web import GatewayWeb, serve_web
from edgetrio.identity import ADMIN_USER, RegistryError
from edgetrio.metrics import HEALTH_TIMEOUT, serve_metrics, store_answers
from edgetrio.process import stop_signals, until_stopped
from edgetrio.writer import Writer, keep_retention, open_writer

log = logging.getLogger("edgetrio.gateway")
CONTROL_REQUESTS_WAITING = 256  # control requests found on the bus and not yet started; more are dropped (logged)


class Counters:
    """What the components count, added to the persistent counters every few seconds."""

    def __init__(self, ingest: Ingest, link: BrokerLink, writer: Writer, hub: EdgeHub | None,
                 automation: Automation | None = None) -> None:
        self.automation = automation
        self.ingest = ingest
        self.link = link
        self.writer = writer
        self.hub = hub
        self.flushed: Counter[str] = Counter()

    def live(self) -> Counter[str]:
        out = Counter(self.ingest.counts)
        out.update(self.link.counters())
        if self.automation is not None:
            out.update(self.automation.counts)
        if self.hub is not None and self.hub.dropped:
            out["outbox_dropped"] = self.hub.dropped
        return out

    async def flush(self) -> None:
        """Add what was counted since the last flush to the persistent counters."""
        current = self.live()
        delta = current - self.flushed
        if delta:
            try:
                await self.writer.write(partial(store.add_counters, counts=delta))
            except Exception as exc:  # the store cannot write: the delta waits for the next flush
                log.debug("counters not flushed: %s", exc)
                return
            self.flushed = current

    async def flush_every(self, seconds: float) -> None:
        while True:
            await trio.sleep(seconds)
            await self.flush()


NODE_REPORT_EVERY = 10.0  # seconds between looks at what the fleet page shows of this gateway (sent when it changed)


def node_report(counters: Counter[str], outbox_rows: int, online: int) -> dict[str, int]:
    """What the relay's fleet page shows of a gateway: what it refused, rejected and dropped, its outbox depth."""
    def total(*prefixes: str) -> int:
        return sum(v for k, v in counters.items() if k.startswith(prefixes))
    return {"readings": counters.get("readings_received", 0),
            "refused": total("auth_refused", "acl_refused", "connect_refused", "connect_timeout", "connect_invalid"),
            "rejected": total("rejected_"), "dropped": total("dropped_", "outbox_dropped"),
            "outbox_rows": outbox_rows, "devices_online": online}


def queue_report(db: Any, mirror: Any, report: dict[str, int]) -> None:
    mirror(db, "node", {"counters": report})


async def report_node(writer: Writer, counters: Counters, health: Health, changes: StateChanges) -> None:
    """Send the node report up the cloud link (through the outbox, like everything else) whenever it changed."""
    last: dict[str, int] | None = None
    while True:
        report = node_report(counters.live(), health.outbox["rows"], len(health.roster.connected()))
        if report != last:
            try:
                await writer.write(partial(queue_report, mirror=changes.mirror, report=report))
                last = report
            except Exception as exc:  # the store cannot write now: the next look sends it
                log.debug("node report not queued: %s", exc)
        await trio.sleep(NODE_REPORT_EVERY)


class Health:
    """What /metrics and /healthz report: a snapshot of the components, and whether the store and broker answer."""

    def __init__(self, roster: Roster, ingest: Ingest, link: BrokerLink, writer: Writer, counters: Counters,
                 hub: EdgeHub | None) -> None:
        self.roster, self.ingest, self.link, self.writer = roster, ingest, link, writer
        self.counters, self.hub = counters, hub
        self.outbox: dict[str, Any] = {"rows": 0, "oldest": None}

    def snapshot(self) -> dict[str, Any]:
        cloud = None
        if self.hub is not None:
            oldest = self.outbox["oldest"]
            cloud = {"connected": self.hub.connected, "outbox_rows": self.outbox["rows"],
                     "outbox_age": max(0.0, time.time() - oldest) if oldest else 0.0}
        return {"registered": len(self.roster.models), "online": len(self.roster.connected()),
                "held": self.ingest.group.uncommitted, "store_ok": self.writer.failure is None,
                "bus_pending": self.link.waiting(), "counters": dict(self.counters.live()), "cloud": cloud}

    async def check(self) -> dict[str, str]:
        broker_state = "no answer"
        with trio.move_on_after(HEALTH_TIMEOUT):
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.link.port)
                await stream.aclose()
                broker_state = "ok"
            except OSError as exc:
                broker_state = f"not listening: {exc}"
        return {"store": await store_answers(self.writer), "broker": broker_state}

    async def watch_outbox(self) -> None:
        while self.hub is not None:
            try:
                self.outbox = await self.writer.write(store.outbox_state)
            except Exception as exc:  # the store cannot read now: keep the last figures
                log.debug("outbox state not read: %s", exc)
            await trio.sleep(5)


@dataclass
class Gateway:
    """The gateway's components, made and ready to serve (what `open_gateway` yields)."""

    cfg: DaemonConfig
    parts: Parts
    credentials: Credentials
    supervisor: Supervisor
    ingest: Ingest
    automation: Automation
    control_requests: trio.MemoryReceiveChannel[bytes]
    site: GatewayWeb
    health: Health
    counters: Counters
    hub: EdgeHub | None
    ha: HomeAssistant | None
    export: Export | None
    updates: Updates
    started: float = field(default_factory=time.time)
    control: ControlServer = field(init=False)

    def __post_init__(self) -> None:
        self.control = ControlServer(self.parts, self.status, self.automation, self.updates)

    def status(self) -> dict[str, Any]:
        """What `edgetrio status` shows of the running daemon; the components' states follow the writer and link."""
        writer, hub, supervisor = self.parts.writer, self.hub, self.supervisor
        store_component = supervisor.components.get("store")
        if store_component is not None:  # the writer keeps going while the store cannot write: say so
            failing = writer.failure is not None
            if failing != (store_component.state == "failing"):
                store_component.become("failing" if failing else "running", writer.failure)
        link = supervisor.components.get("edge link")
        if link is not None and hub is not None and link.state in ("running", "disconnected"):
            wanted = "running" if hub.connected else "disconnected"
            if link.state != wanted:
                link.become(wanted, hub.last_error)
        live = self.counters.live()
        return {
            "components": supervisor.states(),
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "devices_connected": self.parts.roster.connected(),
            "counters": dict(live),
            "counters_unflushed": dict(live - self.counters.flushed),  # not in the store's all-time counters yet
            "writer": {"batches": writer.batches, "operations": writer.ops},
            "store": {"ok": writer.failure is None, "error": writer.failure, "failing_since": writer.failing_since,
                      "readings_held": self.ingest.group.uncommitted},
            "cloud": hub.state() if hub else None,
            "export": {name: dict(state) for name, state in self.export.states.items()} if self.export else {},
            "automation": self.automation.state(),
        }


def open_store(cfg: DaemonConfig) -> tuple[Database, Credentials]:
    try:
        db = store.open_db(cfg.data_dir)
    except RegistryError as exc:
        raise DaemonError(str(exc)) from exc
    _, admin_secret = admin_credential(cfg.data_dir)
    return db, Credentials(admin_secret, store.device_secrets(db), store.integration_secrets(db))


def make_components(cfg: DaemonConfig, parts: Parts, credentials: Credentials, supervisor: Supervisor,
                    down: Down | None) -> Gateway:
    """Every component of the gateway, wired to the parts and to each other (nothing runs yet)."""
    sinks = parse_sinks(cfg.export)
    export = Export(sinks, parts.writer, cfg.node_id or "local") if sinks else None
    automation = Automation(parts, {s.name for s in sinks if s.select == "rules"},
                            export.wake if export else lambda: None)
    hub = None
    if cfg.cloud_url and down is not None:
        hub = EdgeHub(cfg.cloud_url, str(cfg.node_id), str(cfg.cloud_token), parts.writer, down.apply,
                      max_rows=cfg.outbox_max_rows, max_age=cfg.outbox_max_age, cafile=cfg.cloud_cafile)
    requests_in, requests_out = trio.open_memory_channel[bytes](CONTROL_REQUESTS_WAITING)
    ha = HomeAssistant(parts) if cfg.homeassistant else None
    site = GatewayWeb(parts, (ADMIN_USER, credentials.admin_secret), cfg.node_id or "local")
    updates = Updates(parts, cfg.data_dir)
    ingest = Ingest(parts, requests_in, [site, automation, updates, *([ha] if ha else []),
                                         *([export] if export else [])])
    counters = Counters(ingest, parts.link, parts.writer, hub, automation)
    health = Health(parts.roster, ingest, parts.link, parts.writer, counters, hub)
    # the gateway's own fleet page shows what the relay's shows of it
    site.report = lambda: node_report(counters.live(), health.outbox["rows"], len(parts.roster.connected()))
    return Gateway(cfg, parts, credentials, supervisor, ingest, automation, requests_out, site, health, counters, hub,
                   ha, export, updates)


@asynccontextmanager
async def open_gateway(cfg: DaemonConfig) -> AsyncIterator[Gateway]:
    """Open the store and the broker, make the components, load the rules and start ingest; yields the gateway ready
    to serve. Leaving stops the broker, commits what it handed over, and closes the store.

    Raises DaemonError or ConfigError (one-line messages) when it cannot start."""
    lock_fd = lock_data_dir(cfg.data_dir)
    try:
        db, credentials = open_store(cfg)
        tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
        async with open_writer(db) as writer, trio.open_nursery() as nursery:
            ingest_done, chores = trio.Event(), trio.CancelScope()
            supervisor = Supervisor()
            supervisor.add("store", vital=True, state="running")
            async with open_broker(cfg.mqtt_host, cfg.mqtt_port, credentials, max_pending=cfg.max_pending,
                                   max_payload=cfg.max_payload, tls=tls, connect_timeout=cfg.connect_timeout,
                                   max_unauthenticated=cfg.max_unauthenticated,
                                   max_pending_bytes=cfg.max_pending_bytes,
                                   max_device_bytes=cfg.max_device_pending_bytes) as link:
                supervisor.add("broker", vital=True, state="running")
                roster = Roster(db, writer, link, credentials)
                changes = StateChanges(outbox_mirror if cfg.cloud_url else no_mirror)
                parts = Parts(link, writer, roster, changes, Commands(link, writer, roster))
                async with open_down(parts) as down:
                    gateway = make_components(cfg, parts, credentials, supervisor, down)
                    down.rules_changed = gateway.automation.reload
                    down.updates = gateway.updates

                    async def ingest_until_drained() -> None:
                        await supervisor.keep("ingest", gateway.ingest.run, vital=True)
                        ingest_done.set()

                    async def chores_until_stopped() -> None:
                        with chores:
                            async with trio.open_nursery() as chore:
                                chore.start_soon(keep_retention, writer, store.prune, cfg.retention_days)
                                chore.start_soon(gateway.counters.flush_every, 5)
                                if gateway.hub is not None:
                                    chore.start_soon(report_node, writer, gateway.counters, gateway.health, changes)

                    # rules are loaded before the first reading is taken
                    await writer.write(forget_pending)
                    await gateway.automation.reload()
                    await gateway.updates.load()
                    nursery.start_soon(ingest_until_drained)
                    nursery.start_soon(chores_until_stopped)
                    yield gateway
            # the broker has stopped: commit what it handed over; leaving open_writer lets the writer finish
            await ingest_done.wait()
            chores.cancel()
            await gateway.counters.flush()
        log.info("daemon stopped; %d operations committed in %d batches", writer.ops, writer.batches)
    finally:
        (cfg.data_dir / RUN_FILE).unlink(missing_ok=True)  # a stale one would send the CLI to a dead port
        os.close(lock_fd)


async def serve(gateway: Gateway, signals: AsyncIterator[int], *,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve devices, the dashboard, metrics, the cloud link and the CLI until SIGINT or SIGTERM; reports the bound
    MQTT port through task_status once all of it is up."""
    cfg, parts, supervisor, hub = gateway.cfg, gateway.parts, gateway.supervisor, gateway.hub
    link, writer, roster = parts.link, parts.writer, parts.roster
    gauges = GatewayCollector(gateway.health.snapshot, trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as services, serve_metrics(
            cfg.metrics_host, cfg.metrics_port, REGISTRY, gauges, gateway.health.check) as metrics, \
            serve_web(gateway.site, cfg.http_host, cfg.http_port) as dashboard:
        if hub is not None:
            await writer.write(parts.changes.snapshot)
            await writer.write(partial(mirror_open_alerts, mirror=parts.changes.mirror))
            services.start_soon(supervisor.keep, "edge link", hub.run)
            services.start_soon(gateway.health.watch_outbox)
        supervisor.add("control", vital=False, state="running")
        services.start_soon(gateway.control.serve, gateway.control_requests)
        for port in cfg.serial:
            services.start_soon(supervisor.keep, f"serial {port}", SerialDevice(port, link, gateway.credentials).run)
        if gateway.ha is not None:
            services.start_soon(supervisor.keep, "home assistant", gateway.ha.run)
        services.start_soon(supervisor.keep, "automation", gateway.automation.run)
        services.start_soon(supervisor.keep, "firmware updates", gateway.updates.run)
        if gateway.export is not None:
            services.start_soon(supervisor.keep, "export", gateway.export.run)
        supervisor.add("metrics", vital=False, state="running" if metrics else "off")
        supervisor.add("web", vital=False, state="running" if dashboard else "off")
        write_run_file(cfg.data_dir, cfg.mqtt_host, link.port, metrics, dashboard, cfg.max_payload)
        log.info("daemon ready data_dir=%s mqtt=%s:%d devices=%d metrics=%s dashboard=%s", cfg.data_dir,
                 cfg.mqtt_host, link.port, len(roster.models), metrics or "off",
                 f"http://{dashboard}/" if dashboard else "off")
        task_status.started(link.port)
        # the broker listens and the store is open: tell systemd (Type=notify), and feed its watchdog from this loop,
        # so a wedged loop gets the daemon restarted
        notify("READY=1", f"STATUS=serving {len(roster.models)} devices on {cfg.mqtt_host}:{link.port}")
        services.start_soon(feed_watchdog)
        await until_stopped(signals)
        notify("STOPPING=1")
        services.cancel_scope.cancel()


async def run(cfg: DaemonConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the gateway until SIGINT or SIGTERM; then stop the broker, commit what was received, and return."""
    with stop_signals() as signals:
        async with open_gateway(cfg) as gateway:
            await serve(gateway, signals, task_status=task_status)
