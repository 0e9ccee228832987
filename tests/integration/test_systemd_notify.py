"""
A real twistd talking sd_notify to a fake systemd: READY=1 once the port
answers, WATCHDOG=1 at half the watchdog period, STOPPING=1 on SIGTERM; and
the unit's socket-activation endpoint under systemd-socket-activate.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest

from optiinfra.auth import Role, generate

from .test_systemd_units import (
    SERVICE,
    SOCKET,
    environment,
    one,
    read_unit,
    unit_command,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).with_name("twistd"))
WATCHDOG_USEC = 200_000
#: twistd on a free loopback port (its real port is in the "Server starting" line).
ON_A_FREE_PORT = [
    TWISTD,
    "-n",
    "--pidfile=",
    "optiinfra",
    "--port",
    "tcp:0:interface=127.0.0.1",
]


@attrs.frozen
class Datagram:
    text: str
    pid: int  # the sender, as the kernel vouches for it (SCM_CREDENTIALS)
    at: float

    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text.splitlines())


@attrs.define
class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET, with sender credentials like systemd's."""

    sock: socket.socket
    path: str

    def next(self, timeout: float) -> Datagram:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no sd_notify datagram within {timeout}s") from None
        pid = -1
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid, _, _ = struct.unpack("iII", payload[:12])
        return Datagram(data.decode(), pid, time.monotonic())

    def pending(self) -> list[Datagram]:
        datagrams = []
        while True:
            try:
                datagrams.append(self.next(timeout=0.05))
            except AssertionError:
                return datagrams


@pytest.fixture
def fake_systemd() -> Iterator[FakeSystemd]:
    with (
        tempfile.TemporaryDirectory(prefix="sdnotify-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        yield FakeSystemd(sock, path)


class Service:
    """A subprocess whose stdout is JSON lines, read as they come."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> None:
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                # Nothing from the test runner's environment: it may be a systemd
                # service itself (NOTIFY_SOCKET, LISTEN_FDS, WATCHDOG_USEC).
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "PYTHONPATH": str(ROOT),
                **env,
            },
            cwd=cwd,  # no stray .env file
        )
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = orjson.loads(raw)
            self.lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.stderr.append(raw.decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return "\n".join(map(str, self.lines)) + "\nstderr:\n" + "".join(self.stderr)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """The first log line, seen or still to come, matching C{predicate}."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if self._lines.get(timeout=min(left, 0.2)) is None:
                    break
            except queue.Empty:
                pass
        raise AssertionError(f"no such log line in {timeout}s:\n{self.output()}")

    def wait_for_message(self, message: str, timeout: float = 20) -> dict[str, Any]:
        return self.wait_for(lambda line: line.get("message") == message, timeout)

    def wait_for_stderr(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.stderr):
                return
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} on stderr in {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def run() -> Iterator[Any]:
    """Start services; every one is killed after the test, whatever happened."""
    started: list[Service] = []
    with tempfile.TemporaryDirectory() as cwd:

        def start(argv: Sequence[str], env: Mapping[str, str]) -> Service:
            service = Service(argv, env, cwd)
            started.append(service)
            return service

        try:
            yield start
        finally:
            for service in started:
                service.kill()


def get_health(host: str, port: int, timeout: float = 20) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def healthy(service: Service, host: str, port: int) -> bool:
    try:
        return get_health(host, port).startswith(b"HTTP/1.1 200 ")
    except OSError as error:
        raise AssertionError(f"GET /health: {error}\n{service.output()}") from None


def clean_exit(code: int) -> bool:
    # twistd re-raises SIGTERM after a clean shutdown; systemd counts death by
    # SIGTERM as a clean exit, so Restart=on-failure leaves it alone.
    return code in (0, -signal.SIGTERM)


def test_ready_watchdog_stopping(fake_systemd: FakeSystemd, run: Any) -> None:
    service = run(
        ON_A_FREE_PORT,
        {"NOTIFY_SOCKET": fake_systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )

    ready = fake_systemd.next(timeout=30)
    fields = ready.fields()
    assert fields.get("READY") == "1", f"first datagram {ready.text!r}"
    # NotifyAccess=main: systemd only listens to twistd itself.
    assert ready.pid == service.pid
    # The port answers at the moment systemd hears READY=1.
    status = fields["STATUS"]
    assert status.startswith("Serving on 127.0.0.1:")
    port = int(status.rsplit(":", 1)[1])
    assert healthy(service, "127.0.0.1", port)
    assert service.wait_for_message("Server starting")["port"] == port

    pings = [fake_systemd.next(timeout=WATCHDOG_USEC / 1e6 * 5) for _ in range(8)]
    assert {p.text for p in pings} == {"WATCHDOG=1"}
    assert {p.pid for p in pings} == {service.pid}
    gaps = [b.at - a.at for a, b in zip([ready, *pings], pings, strict=False)]
    # Every WATCHDOG_USEC / 2 = 0.1 s; systemd itself would act after 0.2 s.
    assert 0.05 <= statistics.median(gaps) <= 0.15, gaps

    service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while (datagram := fake_systemd.next(timeout=20)).text == "WATCHDOG=1":
        assert time.monotonic() < deadline, "pings but no STOPPING=1"
    assert datagram.fields() == {"STOPPING": "1", "STATUS": "Draining connections"}
    assert datagram.pid == service.pid
    assert clean_exit(service.process.wait(20)), service.output()
    assert fake_systemd.pending() == [], "nothing after STOPPING=1"


def test_watchdog_meant_for_another_process(
    fake_systemd: FakeSystemd, run: Any
) -> None:
    """systemd sets WATCHDOG_PID; a process it does not name must not ping."""
    service = run(
        ON_A_FREE_PORT,
        {
            "NOTIFY_SOCKET": fake_systemd.path,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": "1",
        },
    )
    assert fake_systemd.next(timeout=30).fields()["READY"] == "1"
    time.sleep(WATCHDOG_USEC / 1e6 * 3)
    assert clean_exit(service.stop()), service.output()
    assert [d.fields() for d in fake_systemd.pending()] == [
        {"STOPPING": "1", "STATUS": "Draining connections"}
    ]


def free_dual_stack_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::", 0))
        port: int = sock.getsockname()[1]
        return port


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (apt: systemd)",
)
def test_socket_activation_as_the_units_set_it_up(
    fake_systemd: FakeSystemd, run: Any, tmp_path: Path
) -> None:
    """
    The unit's own ExecStart and environment, on a socket passed the way
    optiinfra.socket passes it: a dual-stack [::]:port with the unit's name.
    """
    unit, socket_unit = read_unit(SERVICE), read_unit(SOCKET)
    assert one(socket_unit, "Socket", "ListenStream").isdigit()
    name = one(socket_unit, "Socket", "FileDescriptorName")
    argv = one(unit, "Service", "ExecStart").split()
    argv[0] = TWISTD
    # What systemd sets up: RuntimeDirectory= under %t, with ExecStartPre=
    # copying the key file there; StateDirectory= gives $STATE_DIRECTORY.
    runtime, state = tmp_path / "run", tmp_path / "state"
    (runtime / one(unit, "Service", "RuntimeDirectory")).mkdir(parents=True)
    state.mkdir()
    source = tmp_path / "etc-api-keys"
    _, line = generate("systemd-test", next(iter(Role)))
    source.write_text(line + "\n")
    source.chmod(0o600)
    substitutions = {"%t": str(runtime), "/etc/optiinfra/api-keys": str(source)}
    for command in unit["Service"].get("ExecStartPre", []):
        subprocess.run(unit_command(command, substitutions), check=True)
    settings = {
        key: unit_command(value, substitutions)[0]
        for key, value in environment(unit).items()
    }
    assert not any("%" in value for value in settings.values()), settings
    settings |= {
        "STATE_DIRECTORY": str(state),
        "PYTHONPATH": str(ROOT),
        "NOTIFY_SOCKET": fake_systemd.path,
    }
    port = free_dual_stack_port()
    service = run(
        [
            "systemd-socket-activate",
            f"--listen={port}",
            f"--fdname={name}",
            *(f"--setenv={key}={value}" for key, value in settings.items()),
            *argv,
        ],
        {},
    )
    service.wait_for_stderr(f"Listening on [::]:{port}")

    # The first connection starts the service; it waits in the backlog meanwhile.
    assert healthy(service, "127.0.0.1", port)
    ready = fake_systemd.next(timeout=30)
    assert ready.fields()["READY"] == "1"
    assert ready.pid == service.pid  # systemd-socket-activate execs in place
    assert service.wait_for_message("Server starting")["port"] == port
    if ipv6_loopback():
        assert healthy(service, "::1", port)
    # Adopted as INET6, IPv4 clients keep their real address (as INET they
    # would be logged as garbage).
    access = service.wait_for(lambda line: line.get("path") == "/health")
    assert "::ffff:127.0.0.1" in orjson.dumps(access).decode(), access

    assert clean_exit(service.stop()), service.output()
    assert fake_systemd.pending()[-1].fields()["STOPPING"] == "1"
