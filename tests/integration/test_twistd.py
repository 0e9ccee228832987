"""The service as an operator runs it: a real twistd process, its logs and signals."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import orjson
import pytest

from .twistd import ROOT, TWISTD, Twistd

LOCAL = "tcp:0:interface=127.0.0.1"
CLEAN_EXITS = (0, -15, 143)  # twistd re-raises SIGTERM after a clean shutdown

pytestmark = pytest.mark.slow


def start(processes: list[Twistd], *args: str, **kwargs: Any) -> Twistd:
    process = Twistd(*args, **kwargs)
    processes.append(process)
    return process


def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_starts_serves_and_logs_json(processes: list[Twistd]) -> None:
    service = start(processes, "--port", LOCAL)
    port = service.port()
    status, _, body = get(port, "/health", **{"X-Request-ID": "it-1"})
    assert status == 200
    assert orjson.loads(body)["status"] == "healthy"
    access = service.wait_for(lambda line: line.get("request_id") == "it-1")
    assert access["logger"] == "optiinfra.access"
    assert access["status"] == 200
    service.signal()
    assert service.wait() in CLEAN_EXITS
    messages = [line["message"] for line in service.lines]
    assert "Starting OptiInfra Orchestrator" in messages
    assert messages.index("Starting OptiInfra Orchestrator") < messages.index(
        "Server starting"
    )
    assert "drained" in messages
    for line in service.lines:  # every line is one JSON object with the basics
        assert {"timestamp", "level", "logger", "message"} <= set(line)
        assert line["timestamp"].endswith("Z")
    # twistd's own start-up lines came through the same observer
    assert any(line["logger"].startswith("twisted.") for line in service.lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(port, "/livez")[0] == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing answered on port {port}")


def test_log_level_filters(processes: list[Twistd]) -> None:
    port = free_port()
    service = start(
        processes,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        env={"LOG_LEVEL": "warn"},
    )
    wait_until_serving(port)
    assert get(port, "/no-such-path")[0] == 404
    service.signal()
    assert service.wait() in CLEAN_EXITS
    levels = {line["level"] for line in service.lines}
    assert levels <= {"warn", "error", "critical"}, service.lines


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORCHESTRATOR_PORT", "abc"),
        ("ORCHESTRATOR_PORT", "70000"),
        ("LOG_LEVEL", "loud"),
        ("DRAIN_TIMEOUT", "-1"),
    ],
)
def test_invalid_setting_stops_startup_with_one_line(
    processes: list[Twistd], variable: str, value: str
) -> None:
    service = start(processes, env={variable: value})
    assert service.wait() != 0
    [line] = service.lines
    assert line["level"] == "error"
    assert variable in line["message"]
    assert repr(value) in line["message"]
    assert (line["setting"], line["value"]) == (variable, value)


def test_bad_endpoint_option_is_named(processes: list[Twistd]) -> None:
    service = start(processes, "--port", "nonsense:1:2")
    assert service.wait() != 0
    assert any("ORCHESTRATOR_PORT" in line["message"] for line in service.lines)


def test_port_in_use_exits_non_zero_with_a_clear_line(processes: list[Twistd]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = start(processes, "--port", f"tcp:{port}:interface=127.0.0.1")
        assert service.wait(timeout=20) != 0
    errors = [line for line in service.lines if line["message"] == "could not listen"]
    assert len(errors) == 1
    assert "Address already in use" in errors[0]["error"]


def test_dotenv_is_read_but_never_overrides_the_environment(
    processes: list[Twistd], tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("ENVIRONMENT=staging\nLOG_LEVEL=loud\n")
    service = start(processes, "--port", LOCAL, cwd=tmp_path, env={"LOG_LEVEL": "info"})
    starting = service.wait_for_message("Starting OptiInfra Orchestrator")
    assert starting["environment"] == "staging"
    assert starting["min_level"] == "info"


def slow_request(port: int, seconds: float, result: dict[str, Any]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", f"/slow?seconds={seconds}")
        response = connection.getresponse()
        result["status"] = response.status
        result["connection"] = response.getheader("Connection")
        result["body"] = response.read()
    except (OSError, http.client.HTTPException) as error:
        result["error"] = error
    finally:
        connection.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_in_flight_requests(processes: list[Twistd]) -> None:
    service = start(
        processes, "--port", LOCAL, "--drain-timeout", "10", plugin="optiinfra-slowtest"
    )
    port = service.port()
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    idle.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    result: dict[str, Any] = {}
    client = threading.Thread(target=slow_request, args=(port, 1.5, result))
    client.start()
    service.wait_for_message("slow request started")
    signalled = time.monotonic()
    service.signal()
    service.wait_for_message("draining")
    assert idle.recv(65536) == b""  # the idle keep-alive connection closed at once
    idle.close()
    assert refused(port)  # no new connections while draining
    client.join(15)
    assert result.get("status") == 200, result
    assert result["connection"] == "close"
    assert orjson.loads(result["body"]) == {"slept": 1.5}
    assert service.wait(timeout=15) in CLEAN_EXITS
    assert time.monotonic() - signalled < 10
    access = service.wait_for(lambda line: line.get("path") == "/slow")
    assert access["status"] == 200
    assert "aborted" not in access
    assert service.lines[-1]["message"] in (
        "Server Shut Down.",
        "Main loop terminated.",
    )


def test_drain_timeout_cuts_slow_requests(processes: list[Twistd]) -> None:
    service = start(
        processes,
        "--port",
        LOCAL,
        "--drain-timeout",
        "0.5",
        plugin="optiinfra-slowtest",
    )
    port = service.port()
    result: dict[str, Any] = {}
    client = threading.Thread(target=slow_request, args=(port, 30, result))
    client.start()
    service.wait_for_message("slow request started")
    signalled = time.monotonic()
    service.signal()
    assert service.wait(timeout=10) in CLEAN_EXITS
    assert time.monotonic() - signalled < 5
    client.join(10)
    assert "error" in result  # the connection was cut, no partial answer
    access = service.wait_for(lambda line: line.get("path") == "/slow")
    assert access["aborted"] is True
    assert access["level"] == "warn"


def test_plugin_is_listed_and_the_wheel_is_clean(tmp_path: Path) -> None:
    listing = subprocess.run(
        [TWISTD, "--help"], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert "optiinfra" in listing.stdout
    subprocess.run(
        [
            str(Path(TWISTD).with_name("pip")),
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/optiinfra_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [name for name in names if name.endswith("dropin.cache")]
    console = {"index.html", "console.js", "feed.js", "api.js", "console.css"}
    assert {f"optiinfra/console/static/{name}" for name in console} <= set(names)
