"""Start real C{twistd} processes and read their JSON log lines."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
SLOWTAP = Path(__file__).resolve().parent / "slowtap"
TWISTD = str(Path(sys.executable).with_name("twistd"))


class Twistd:
    """One twistd subprocess; every stdout line is parsed as JSON as it arrives."""

    def __init__(
        self,
        *args: str,
        plugin: str = "optiinfra",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_",))
        }
        for name in ("LOG_LEVEL", "ENVIRONMENT", "DRAIN_TIMEOUT", "NOTIFY_SOCKET"):
            environment.pop(name, None)
        environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SLOWTAP)])
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            environment.pop(name, None)
        # Each process gets its own embedded store unless the test says otherwise.
        environment["STATE_DIR"] = tempfile.mkdtemp(prefix="optiinfra-state-")
        environment.update(env or {})
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", plugin, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            cwd=cwd or ROOT,
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.raw.append(raw)
            line = orjson.loads(raw)  # every line must be JSON
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        """The first line (already seen or still to come) matching C{predicate}."""
        for line in list(self.lines):
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if predicate(line):
                return line
        raise AssertionError(
            f"no matching log line within {timeout}s; got:\n"
            + b"".join(self.raw).decode(errors="replace")
        )

    def wait_for_message(self, message: str, timeout: float = 15) -> dict[str, Any]:
        return self.wait_for(lambda line: line.get("message") == message, timeout)

    def port(self) -> int:
        return int(self.wait_for_message("Server starting")["port"])

    def signal(self, number: int = signal.SIGTERM) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = 15) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def run_twistd(*args: str, **kwargs: Any) -> Iterator[Twistd]:
    process = Twistd(*args, **kwargs)
    try:
        yield process
    finally:
        process.kill()
