"""Daemon settings: defaults, a TOML config file, and command-line flags (flags win)."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgetrio import process, wire
from edgetrio.identity import ADMIN_USER, new_secret


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line naming the file and the key."""


@dataclass
class DaemonConfig:
    """The daemon's settings: defaults, then the config file, the environment and the flags (docs/operations.md)."""

    data_dir: Path = Path("edgetrio-data")
    mqtt_host: str = "0.0.0.0"  # devices reach the gateway over Wi-Fi
    mqtt_port: int = 1883
    max_payload: int = 64 * 1024  # bytes; larger MQTT messages are dropped and counted
    max_pending: int = 50_000  # bus events waiting for ingest before new ones are refused (overload)
    max_pending_bytes: int = 32 << 20  # payload bytes waiting for ingest, all devices together
    max_device_pending_bytes: int = 4 << 20  # ... from one device; past it a flooding device's messages are refused
    connect_timeout: float = 10.0  # seconds a new connection may take to send CONNECT
    max_unauthenticated: int = 256  # connections waiting for their CONNECT; more are closed at once
    log_level: str = "info"
    tls_cert: str | None = None
    tls_key: str | None = None
    serial: list[str] = field(default_factory=list)
    cloud_url: str | None = None  # ws://host:port or wss://host:port of the relay
    node_id: str | None = None
    cloud_token: str | None = None
    cloud_token_file: Path | None = None  # the token from a file instead (keeps it out of `ps` and the config)
    cloud_cafile: str | None = None  # CA to trust for wss (default: the system's)
    outbox_max_rows: int = 1_000_000
    outbox_max_age: float = 7 * 86400.0  # seconds
    retention_days: float = 90.0  # readings, events and rejects older than this are deleted; 0 keeps everything
    metrics_host: str = "127.0.0.1"  # /metrics and /healthz; keep it local unless a scraper elsewhere needs it
    metrics_port: int = 9883  # 0 picks a free one (written to the run file); -1 turns metrics and health off
    http_host: str = "127.0.0.1"  # the dashboard; expose it (0.0.0.0) only on a network you trust
    http_port: int = 8080  # 0 picks a free one (written to the run file); -1 turns the dashboard off
    homeassistant: bool = False  # MQTT discovery for Home Assistant (credential: `edgetrio integration add`)
    export: list[dict[str, Any]] = field(default_factory=list)  # sinks readings are copied to ([[export]] tables)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "data_dir": str, "mqtt_host": str, "mqtt_port": int, "max_payload": int, "max_pending": int,
    "connect_timeout": (int, float), "max_unauthenticated": int, "max_pending_bytes": int,
    "max_device_pending_bytes": int,
    "log_level": str, "tls_cert": str, "tls_key": str, "serial": list, "cloud_url": str, "node_id": str,
    "cloud_token": str, "cloud_token_file": str, "cloud_cafile": str, "outbox_max_rows": int, "outbox_max_age": (int, float),
    "retention_days": (int, float), "metrics_host": str, "metrics_port": int, "homeassistant": bool,
    "http_host": str, "http_port": int, "export": list,
}
SINK_KINDS = ("webhook", "mqtt")
SINK_KEYS = {"name", "type", "url", "topic", "qos", "batch", "headers", "start", "select"}


@dataclass(frozen=True)
class Sink:
    """Where readings are exported to, each sink with its own durable cursor (see edgetrio/daemon/export.py)."""

    name: str
    kind: str  # webhook | mqtt
    url: str  # http(s)://host/path, or mqtt(s)://[user:password@]host[:port]
    topic: str = "edgetrio/export/{device}"  # mqtt: the topic of each reading ({device}, {node})
    qos: int = 1
    batch: int = 500  # readings per webhook request or per round of MQTT publishes
    headers: tuple[tuple[str, str], ...] = ()  # webhook: extra headers (an Authorization, say)
    start: str = "now"  # a new sink: from the readings that come after it was added ("now") or from all stored ("all")
    select: str = "all"  # every reading ("all"), or only those rules send it with an `export` action ("rules")


def parse_sinks(items: list[Any]) -> list[Sink]:
    """The [[export]] tables of the config; raise ConfigError naming the sink and what is wrong."""
    sinks: list[Sink] = []
    for i, body in enumerate(items):
        if not isinstance(body, dict):
            raise ConfigError(f"export[{i}] must be a table ([[export]] with name, type, url)")
        name = body.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ConfigError(f"export[{i}] needs a 'name' (1-64 characters)")
        what = f"export {name!r}"
        unknown = set(body) - SINK_KEYS
        if unknown:
            raise ConfigError(f"{what}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(SINK_KEYS))})")
        kind, url = body.get("type"), body.get("url")
        if kind not in SINK_KINDS:
            raise ConfigError(f"{what}: type must be one of {', '.join(SINK_KINDS)}, not {kind!r}")
        schemes = ("http://", "https://") if kind == "webhook" else ("mqtt://", "mqtts://")
        if not isinstance(url, str) or not url.startswith(schemes) or not urlsplit(url).hostname:
            raise ConfigError(f"{what}: url must be {' or '.join(s + 'host...' for s in schemes)}, not {url!r}")
        try:
            urlsplit(url).port  # noqa: B018  (raises on a port that is not a number)
        except ValueError as exc:
            raise ConfigError(f"{what}: url {url!r}: {exc}") from exc
        topic = body.get("topic", Sink.topic)
        if not isinstance(topic, str) or not topic or any(c in topic for c in "+#\0") or topic.startswith("$"):
            raise ConfigError(f"{what}: topic must be a topic to publish to (no + or #), such as "
                              "\"plant/{{device}}\"")
        qos, batch, start = body.get("qos", 1), body.get("batch", 500), body.get("start", "now")
        if qos not in (0, 1, 2) or isinstance(qos, bool):
            raise ConfigError(f"{what}: qos must be 0, 1 or 2")
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 10_000:
            raise ConfigError(f"{what}: batch must be from 1 to 10000 readings")
        if start not in ("now", "all"):
            raise ConfigError(f"{what}: start must be \"now\" or \"all\"")
        select = body.get("select", "all")
        if select not in ("all", "rules"):
            raise ConfigError(f"{what}: select must be \"all\" (every reading) or \"rules\" (what rules export)")
        headers = body.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ConfigError(f"{what}: headers must be a table of strings")
        if name in {s.name for s in sinks}:
            raise ConfigError(f"{what} is named twice")
        sinks.append(Sink(name, kind, url, topic, qos, batch, tuple(headers.items()), start, select))
    return sinks


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into checked settings; raise ConfigError on any problem."""
    try:
        raw = wire.loads_toml(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, too deep
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    known = {f.name for f in fields(DaemonConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        expected = _TYPES[name]
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            raise ConfigError(f"config file {path}: {key} must be a {getattr(expected, '__name__', expected)}")
        # a relative path in a config file is relative to the file, wherever the daemon is started from
        if name in ("data_dir", "cloud_token_file"):
            value = (path.parent / str(value)).expanduser().absolute()
        elif name in ("tls_cert", "tls_key", "cloud_cafile"):
            value = str((path.parent / str(value)).expanduser().absolute())
        out[name] = value
    return out


def build_config(file_settings: dict[str, Any], flags: dict[str, Any]) -> DaemonConfig:
    """The daemon's settings from its config file and flags (flags win), each checked: a ConfigError names the bad
    one."""
    settings = {**file_settings, **{k: v for k, v in flags.items() if v is not None and v != []}}
    cfg = DaemonConfig(**settings)
    cfg.data_dir = cfg.data_dir.absolute()  # handed on to children (virtual boards, backups) that run elsewhere
    if not 0 <= cfg.mqtt_port <= 65535:
        raise ConfigError(f"mqtt port {cfg.mqtt_port} is out of range 0-65535")
    if not -1 <= cfg.metrics_port <= 65535:
        raise ConfigError(f"metrics port {cfg.metrics_port} is out of range (-1 turns metrics off, 0 picks one)")
    if not -1 <= cfg.http_port <= 65535:
        raise ConfigError(f"http port {cfg.http_port} is out of range (-1 turns the dashboard off, 0 picks one)")
    if cfg.retention_days < 0:
        raise ConfigError("retention_days must be 0 (keep everything) or more")
    if not 0.5 <= cfg.connect_timeout <= 300:
        raise ConfigError("connect_timeout must be from 0.5 to 300 seconds")
    if not cfg.max_payload <= cfg.max_device_pending_bytes <= cfg.max_pending_bytes:
        raise ConfigError("need max_payload <= max_device_pending_bytes <= max_pending_bytes")
    if cfg.max_unauthenticated < 1:
        raise ConfigError("max_unauthenticated must be at least 1")
    if cfg.max_payload < 256:
        raise ConfigError("max_payload must be at least 256 bytes")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level {cfg.log_level!r}: use debug, info, warning or error")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together")
    if cfg.cloud_token_file is not None and not cfg.cloud_token:
        try:
            cfg.cloud_token = cfg.cloud_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {cfg.cloud_token_file}: {exc}") from exc
        if not cfg.cloud_token:
            raise ConfigError(f"the token file {cfg.cloud_token_file} is empty")
    parse_sinks(cfg.export)
    if cfg.cloud_url:
        if not cfg.cloud_url.startswith(("ws://", "wss://")):
            raise ConfigError(f"cloud url {cfg.cloud_url!r} must start with ws:// or wss://")
        if not cfg.node_id or not cfg.cloud_token:
            raise ConfigError("a cloud link needs a node id and a token (--node-id, and --token-file, "
                              "$EDGETRIO_CLOUD_TOKEN or --token)")
    return cfg


# -- files the daemon keeps in its data dir --------------------------------------------------------------------------

ADMIN_FILE = "admin.json"
RUN_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"


def admin_credential(data_dir: Path) -> tuple[str, str]:
    """The admin username and password for the broker, created on first use (file mode 0600)."""
    path = data_dir / ADMIN_FILE
    if path.exists():
        try:
            body = wire.loads(path.read_text())
            return body["username"], body["password"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is corrupt; delete it to issue a new admin credential") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"username": ADMIN_USER, "password": secret}, f)
    return ADMIN_USER, secret


class DaemonError(Exception):
    """The daemon cannot start; the message is one line for the user."""


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the life of the process, so two daemons never share it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(f"another daemon is already running on {data_dir}") from None
    return fd


def daemon_running(data_dir: Path) -> bool:
    path = data_dir / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_run_file(data_dir: Path, mqtt_host: str, port: int, metrics: str | None = None,
                   http: str | None = None, max_payload: int = 64 * 1024) -> None:
    """Tell the CLI and local apps where the running daemon listens (and serves metrics and the dashboard,
    "host:port")."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(mqtt_host, mqtt_host)
    process.write_run_file(data_dir / RUN_FILE, {
        "mqtt_host": host, "mqtt_port": port, "metrics": metrics, "http": http,
        "mqtt_listen": mqtt_host,  # mqtt_host: where this machine connects
        "max_payload": max_payload})


def read_run_file(data_dir: Path) -> dict[str, Any]:
    path = data_dir / RUN_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        return info
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no running daemon found in {data_dir} (start one with `edgetrio daemon`)") from exc
