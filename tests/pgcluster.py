"""
A PostgreSQL cluster of the test's own, for tests that crash, freeze or stop it.

C{initdb} in a temporary directory, C{pg_ctl} on a free port of 127.0.0.1, its
socket in that directory: the shared cluster on 5432 is never touched.  The
cluster can be crashed (C{pg_ctl -m immediate}: no checkpoint, what the WAL
holds on the disk is all that comes back), frozen (SIGSTOP to the postmaster
and every backend: a stalled disk or a partition) and started again.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .databases import REQUIRE_POSTGRES


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's programs, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]),
    )
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_user() -> tuple[str, ...]:
    """
    How to run the server's programs: as ourselves, or (PostgreSQL refuses to
    run as root) as the C{postgres} account when the tests run as root.
    """
    if os.geteuid() != 0:
        return ()
    pwd.getpwnam("postgres")  # KeyError: no account to run it as
    return ("runuser", "-u", "postgres", "--")


class PrivateCluster:
    """One cluster in C{directory}, listening on 127.0.0.1:C{port}, trust auth."""

    def __init__(self, bin_dir: Path, directory: Path, **settings: str) -> None:
        self._bin = bin_dir
        self._as = _server_user()
        if self._as:
            account = pwd.getpwnam("postgres")
            os.chown(directory, account.pw_uid, account.pw_gid)
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        #: Server settings (C{-c name=value}) on top of those of a quick test.
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(directory),
            "max_connections": "40",
            "shared_buffers": "16MB",
            **settings,
        }
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self._bin / program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

    def start(self) -> None:
        """Start (or restart after a crash, replaying the WAL) and wait for it."""
        options = " ".join(
            f"-c {name}={value}" for name, value in self.settings.items()
        )
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "server.log"),
            "-o",
            options,
        )

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def crash(self) -> None:
        """Stop at once, as a crash does: no checkpoint, no flush of the WAL buffers."""
        self.thaw()
        self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data))

    def stop(self) -> None:
        self.thaw()
        self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data))

    def _postmaster(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return None
        return int(pidfile.read_text().split()[0])

    def _pids(self) -> list[int]:
        """The postmaster first, then its children (listed after it stopped)."""
        postmaster = self._postmaster()
        if postmaster is None:
            return []
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def freeze(self) -> None:
        """SIGSTOP the postmaster and its backends: connections stay open, mute."""
        postmaster = self._postmaster()
        if postmaster is not None:  # first: then it forks no backend meanwhile
            os.kill(postmaster, signal.SIGSTOP)
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):  # a backend just ended
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url, connect_timeout=10, autocommit=True) as db:
            return db.execute(sql).fetchall()


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    """A started cluster of this test's own; skipped (failed in CI) without one."""
    bin_dir = postgres_bin()
    if bin_dir is None or shutil.which("pgrep") is None:
        reason = "no PostgreSQL server programs (initdb, pg_ctl) installed"
        if REQUIRE_POSTGRES:
            pytest.fail(reason)
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="optiinfra-pg-"))
    cluster = PrivateCluster(bin_dir, directory)
    cluster.start()
    try:
        yield cluster
    finally:
        if cluster.running:
            cluster.crash()
        shutil.rmtree(directory, ignore_errors=True)
