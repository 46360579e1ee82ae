"""A PostgreSQL server of the tests' own: Debian's `postgresql` package, a temporary cluster on a free port.

The server refuses to run as root (CI runs as root): then the cluster belongs to the `postgres` user the package made,
and its commands run as that user (runuser).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg


def server_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server commands (pg_ctl, initdb), None when not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def create_database(server: str) -> str:
    """A new, empty database on the server at `server` (a URL of one of its databases); its URL."""
    name = f"relay_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server.rsplit('/', 1)[0]}/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """One cluster: `start`, `database()` for a fresh database's URL, `stop`/`kill`/`start` again (the same data)."""

    def __init__(self) -> None:
        bindir = server_bin()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
        self.bin = bindir
        self.base = Path(tempfile.mkdtemp(prefix="edgetrio-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            os.chmod(self.base, 0o755)
            shutil.chown(self.base, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "edgetrio", "--auth=trust", "--locale=C", "-E", "UTF8",
                  "--no-sync")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / tool), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.base)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        return proc

    def start(self) -> Postgres:
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c max_connections=300 "
                   "-c shared_buffers=32MB -c fsync=on")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-o", options, "-w", "-t", "60",
                  "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def crash(self) -> None:
        """The server stopped as a crash leaves it: every connection cut, no checkpoint (it recovers at start)."""
        self.stop("immediate")

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def url(self, name: str) -> str:
        return f"postgresql://edgetrio@127.0.0.1:{self.port}/{name}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        return create_database(self.url("postgres"))

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)
