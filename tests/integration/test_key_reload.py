"""
The key file as an operator meets it: a real twistd, a real SIGHUP, and the
systemd unit's own start and reload commands run for real.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
from pathlib import Path

import pytest

from optiinfra.auth import Role, generate

from .test_systemd_units import SERVICE, environment, read_unit, unit_command
from .twistd import Twistd

LOCAL = "tcp:0:interface=127.0.0.1"
CLEAN_EXITS = (0, -15, 143)

pytestmark = pytest.mark.slow


def write_keys(path: Path, *names: str, mode: int = 0o600) -> dict[str, str]:
    """A key file (replaced by rename) with one operator key per name."""
    keys, lines = {}, []
    for name in names:
        keys[name], line = generate(name, Role.OPERATOR)
        lines.append(line)
    new = path.with_name(path.name + ".tmp")
    new.write_text("\n".join(lines) + "\n")
    new.chmod(mode)
    new.replace(path)
    return keys


def status(connection: http.client.HTTPConnection, key: str) -> int:
    connection.request("GET", "/agents", headers={"Authorization": f"Bearer {key}"})
    response = connection.getresponse()
    response.read()
    return response.status


def test_a_key_file_others_may_write_stops_the_start(
    processes: list[Twistd], tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    write_keys(path, "alice", mode=0o664)
    process = Twistd("--port", LOCAL, env={"API_KEYS_FILE": str(path)})
    processes.append(process)
    assert process.wait() == 2
    [line] = process.lines
    assert line["level"] == "error"
    assert line["setting"] == "API_KEYS_FILE"
    assert line["value"] == str(path)
    assert "mode 0664" in line["message"]
    assert "lets group write it" in line["message"]


def test_sighup_revokes_a_key_on_an_open_connection(
    processes: list[Twistd], tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    keys = write_keys(path, "alice", "bob")
    process = Twistd("--port", LOCAL, env={"API_KEYS_FILE": str(path)})
    processes.append(process)
    connection = http.client.HTTPConnection("127.0.0.1", process.port(), timeout=10)
    assert status(connection, keys["bob"]) == 200
    sock = connection.sock

    carol = write_keys(path, "alice", "carol")["carol"]
    process.signal(signal.SIGHUP)
    reloaded = process.wait_for_message("API keys reloaded")
    assert (reloaded["added"], reloaded["removed"]) == (["carol"], ["bob"])
    assert status(connection, keys["bob"]) == 401
    assert status(connection, carol) == 200
    assert connection.sock is sock  # the same keep-alive connection throughout

    # A bad file keeps the keys in use, whatever is wrong with it.
    path.write_text("alice operator sha256:not-a-hash\n")
    process.signal(signal.SIGHUP)
    bad = process.wait_for(lambda line: "not reloaded" in line["message"])
    assert bad["level"] == "error"
    assert "line 1" in bad["error"]
    write_keys(path, "mallory", mode=0o666)
    process.signal(signal.SIGHUP)
    process.wait_for(lambda line: "mode 0666" in line.get("error", ""))
    assert status(connection, carol) == 200
    assert connection.sock is sock

    output = b"".join(process.raw).decode()
    for key in (*keys.values(), carol):
        assert key not in output  # names are logged, never keys
    assert process.process.poll() is None  # SIGHUP does not end it
    process.signal()
    assert process.wait() in CLEAN_EXITS


def test_the_units_start_and_reload_commands_reload_the_keys(
    processes: list[Twistd], tmp_path: Path
) -> None:
    """
    systemd cannot run here, but its commands can: the unit's ExecStartPre=
    and ExecReload= lines, with %t and /etc/optiinfra/api-keys pointing into a
    temporary directory, against a real twistd.
    """
    unit = read_unit(SERVICE)["Service"]
    runtime = tmp_path / "run"
    (runtime / unit["RuntimeDirectory"][0]).mkdir(parents=True, mode=0o700)
    source = tmp_path / "etc-api-keys"
    substitutions = {"%t": str(runtime), "/etc/optiinfra/api-keys": str(source)}
    keys = write_keys(source, "alice")
    for line in unit["ExecStartPre"]:
        subprocess.run(unit_command(line, substitutions), check=True)
    copy = unit_command(environment(read_unit(SERVICE))["API_KEYS_FILE"], substitutions)
    process = Twistd("--port", LOCAL, env={"API_KEYS_FILE": copy[0]})
    processes.append(process)
    connection = http.client.HTTPConnection("127.0.0.1", process.port(), timeout=10)
    assert status(connection, keys["alice"]) == 200

    bob = write_keys(source, "bob")["bob"]
    substitutions["$MAINPID"] = str(process.process.pid)
    for line in unit["ExecReload"]:
        subprocess.run(unit_command(line, substitutions), check=True)
    reloaded = process.wait_for_message("API keys reloaded")
    assert (reloaded["added"], reloaded["removed"]) == (["bob"], ["alice"])
    assert status(connection, keys["alice"]) == 401
    assert status(connection, bob) == 200
