"""`edgetrio service install`: systemd units for the gateway daemon and the relay, with a config file and a data dir.

The daemon's unit is `Type=notify` with a watchdog (the daemon says READY=1 once the broker listens and the store is
open, and feeds the watchdog from its trio loop); the relay's is a plain service. Both restart on failure.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WATCHDOG_SEC = 30


@dataclass(frozen=True)
class Layout:
    """Where a unit, its config file and its data dir go, for the system (root) or for one user."""

    units: Path
    config: Path
    data: Path
    wanted_by: str
    user: bool


def layout(user: bool) -> Layout:
    if user:
        home = Path.home()
        config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
        return Layout(config / "systemd" / "user", config / "edgetrio", data / "edgetrio", "default.target", True)
    return Layout(Path("/etc/systemd/system"), Path("/etc/edgetrio"), Path("/var/lib/edgetrio"),
                  "multi-user.target", False)


# how both units run: restarted on failure, files private to the service, no new privileges, /usr and /etc read-only
RUN_AS_SERVICE = """Restart=on-failure
RestartSec=5
TimeoutStopSec=30
UMask=0077
NoNewPrivileges=yes
ProtectSystem=full
PrivateTmp=yes"""


def daemon_files(where: Layout) -> dict[Path, str]:
    config = where.config / "daemon.toml"
    unit = f"""[Unit]
Description=edgetrio gateway daemon (MQTT broker, store, cloud link)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={sys.executable} -m edgetrio daemon --config {config}
WatchdogSec={WATCHDOG_SEC}
{RUN_AS_SERVICE}
{"" if where.user else "StateDirectory=edgetrio"}

[Install]
WantedBy={where.wanted_by}
"""
    settings = f"""# edgetrio gateway daemon settings; flags given on the command line win. Reference: docs/operations.md
data_dir = "{where.data / 'gateway'}"
mqtt_host = "0.0.0.0"        # devices reach the gateway over Wi-Fi
mqtt_port = 1883
metrics_host = "127.0.0.1"   # /metrics (Prometheus) and /healthz
metrics_port = 9883
http_host = "127.0.0.1"      # the dashboard (docs/dashboard.md); 0.0.0.0 only on a network you trust
http_port = 8080
log_level = "info"
retention_days = 90
# homeassistant = true       # MQTT discovery (credential: `edgetrio integration add homeassistant`)
# cloud_url = "wss://relay.example.net:8765"
# node_id = "gateway-1"
# cloud_token_file = "{where.config / 'cloud-token'}"
"""
    return {where.units / "edgetrio-daemon.service": unit, config: settings}


def relay_files(where: Layout) -> dict[Path, str]:
    unit = f"""[Unit]
Description=edgetrio cloud relay (edges dial in, HTTP API)
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={sys.executable} -m edgetrio cloud serve --data-dir {where.data / 'relay'} --host 0.0.0.0 --port 8765
{RUN_AS_SERVICE}

[Install]
WantedBy={where.wanted_by}
"""
    return {where.units / "edgetrio-relay.service": unit}


def install(what: str, user: bool, dry_run: bool) -> list[tuple[Path, str, bool]]:
    """Write the unit and config files (an existing config file is kept); returns (path, text, written)."""
    where = layout(user)
    files = daemon_files(where) if what == "daemon" else relay_files(where)
    done = []
    for path, text in files.items():
        keep = path.suffix == ".toml" and path.exists()  # the user's settings are theirs
        if not dry_run and not keep:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        done.append((path, text, not dry_run and not keep))
    if not dry_run:
        (where.data / ("gateway" if what == "daemon" else "relay")).mkdir(parents=True, exist_ok=True, mode=0o700)
        reload = ["systemctl", *(["--user"] if user else []), "daemon-reload"]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # no systemd here: the files wait for one
            subprocess.run(reload, capture_output=True, timeout=30, check=False)
    return done
