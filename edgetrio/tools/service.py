"""`edgetrio service install`: systemd units for the gateway daemon and the relay, with a config file and a data dir.

The daemon's unit is `Type=notify` with a watchdog (the daemon says READY=1 once the broker listens and the store is
open, and feeds the watchdog from its trio loop); the relay's is a plain service. Both restart on failure. A system
install runs both as the system user `edgetrio` (created if missing, in the serial ports' group), never as root.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WATCHDOG_SEC = 30
SERVICE_USER = "edgetrio"  # a system install's services run as this user, never as root
SERIAL_GROUP = "dialout"  # Debian's group of /dev/ttyUSB* and /dev/ttyACM*: boards on serial


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
# LimitNOFILE: each board, dashboard stream and edge link is a socket; the 1,024 a shell gets by default would let
# a crowd of them starve the store of file descriptors
RUN_AS_SERVICE = """LimitNOFILE=65536
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
UMask=0077
NoNewPrivileges=yes
ProtectSystem=full
PrivateTmp=yes"""


def temporary_home() -> Path | None:
    """The temporary folder this Python or edgetrio's code lives in, if any: PrivateTmp=yes would hide it from the
    service (a venv made under /tmp to try edgetrio out)."""
    for target in (Path(sys.executable), Path(__file__).resolve().parents[1]):
        for temporary in (Path("/tmp"), Path("/var/tmp")):
            if target.is_relative_to(temporary):
                return temporary
    return None


def run_as_service() -> str:
    return RUN_AS_SERVICE if temporary_home() is None else RUN_AS_SERVICE.replace("\nPrivateTmp=yes", "")


def run_as(where: Layout) -> str:
    """The unit lines that make a system service run as its own user (a user service runs as its user already)."""
    return "" if where.user else f"User={SERVICE_USER}\nGroup={SERVICE_USER}\nStateDirectory=edgetrio\n"


def daemon_files(where: Layout) -> dict[Path, str]:
    """The daemon's systemd unit and a commented config file, for a system or a user install."""
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
{run_as(where)}{run_as_service()}

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
{run_as(where)}{run_as_service()}

[Install]
WantedBy={where.wanted_by}
"""
    return {where.units / "edgetrio-relay.service": unit}


def service_user(dry_run: bool) -> str:
    """Make sure the system user exists; returns what was done, in words."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(SERVICE_USER)
        return f"runs as the system user {SERVICE_USER}"
    groups = []
    with contextlib.suppress(KeyError):
        grp.getgrnam(SERIAL_GROUP)
        groups = ["--groups", SERIAL_GROUP]
    if dry_run:
        return f"would create the system user {SERVICE_USER} to run as"
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    made = subprocess.run([useradd, "--system", "--user-group", *groups, "--home-dir", "/var/lib/edgetrio",
                           "--no-create-home", "--shell", "/usr/sbin/nologin", "--comment", "edgetrio services",
                           SERVICE_USER], capture_output=True, text=True, timeout=60, check=False)
    if made.returncode != 0:
        raise OSError(f"could not create the system user {SERVICE_USER}: {made.stderr.strip() or made.returncode}")
    return f"created the system user {SERVICE_USER} to run as"


def unreachable_for_others() -> Path | None:
    """The first folder on the way to this Python or to edgetrio's code that other users cannot pass (a pipx or venv
    install under /root or a 0700 home): the service user could not even start the service."""
    for target in (Path(sys.executable), Path(__file__).resolve().parents[1]):
        for folder in [*reversed(target.parents), *([target] if target.is_dir() else [])]:
            with contextlib.suppress(OSError):
                if not folder.stat().st_mode & stat.S_IXOTH:
                    return folder
    return None


def install(what: str, user: bool, dry_run: bool) -> tuple[list[tuple[Path, str, bool]], list[str]]:
    """Write the unit and config files (an existing config file is kept); returns (path, text, written) and notes for
    the user."""
    where = layout(user)
    files = daemon_files(where) if what == "daemon" else relay_files(where)
    notes = [] if user else [service_user(dry_run)]
    if not user and (blocked := unreachable_for_others()) is not None:
        problem = (f"the service user {SERVICE_USER} cannot reach {sys.executable} or edgetrio's code ({blocked} is "
                   "closed to other users): install edgetrio where every user can, e.g. `sudo PIPX_HOME=/opt/pipx "
                   "PIPX_BIN_DIR=/usr/local/bin pipx install edgetrio`, then run this again")
        if not dry_run:
            raise OSError(problem)
        notes.append(problem)
    if (temporary := temporary_home()) is not None:
        notes.append(f"edgetrio runs from {temporary}: the unit leaves out PrivateTmp=yes (it would hide that folder "
                     "from the service); install it elsewhere for a service you keep")
    if what == "relay":
        notes.append("the relay serves on 0.0.0.0:8765 over plain HTTP: operators' passwords and edges' tokens cross "
                     "the network unencrypted unless a TLS proxy fronts it (docs/cloud.md); to serve on this machine "
                     "only, change --host 0.0.0.0 to --host 127.0.0.1 in the unit's ExecStart (`systemctl edit --full "
                     "edgetrio-relay`)")
    done = []
    for path, text in files.items():
        keep = path.suffix == ".toml" and path.exists()  # the user's settings are theirs
        if not dry_run and not keep:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        done.append((path, text, not dry_run and not keep))
    if not dry_run:
        data = where.data / ("gateway" if what == "daemon" else "relay")
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not user:
            owner = pwd.getpwnam(SERVICE_USER)
            for path in (where.data, data):  # systemd would hand the state dir over at the first start; the CLI
                os.chown(path, owner.pw_uid, owner.pw_gid)  # may use it before
            # the settings (and a token file beside them) are root's to change and the service's to read
            os.chown(where.config, 0, owner.pw_gid)
            where.config.chmod(0o750)
            for path in files:
                if path.parent == where.config:
                    os.chown(path, 0, owner.pw_gid)
                    path.chmod(0o640)
        reload = ["systemctl", *(["--user"] if user else []), "daemon-reload"]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # no systemd here: the files wait for one
            subprocess.run(reload, capture_output=True, timeout=30, check=False)
    return done, notes
