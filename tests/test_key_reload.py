"""
The key file's mode, and reloading it: in process, over real sockets.
tests/integration/test_key_reload.py sends a real SIGHUP to a real twistd.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from optiinfra.auth import ApiKeyFileError, ApiKeys, KeyChanges, Role, generate
from optiinfra.keyreload import KeyReloader

from .conftest import LogCapture, RunningService, StartService


def write_keys(path: Path, *names: str, mode: int = 0o600) -> dict[str, str]:
    """A key file with one operator key per name; the keys, by name."""
    keys, lines = {}, []
    for name in names:
        keys[name], line = generate(name, Role.OPERATOR)
        lines.append(line)
    replace(path, "\n".join(lines) + "\n", mode)
    return keys


def replace(path: Path, text: str, mode: int = 0o600) -> None:
    """Write C{path} the way an editor or a deploy tool does: a new file, renamed."""
    new = path.with_suffix(".new")
    new.write_text(text)
    new.chmod(mode)
    new.replace(path)


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o620, "group"), (0o602, "others"), (0o666, "group and others")],
)
def test_a_key_file_others_may_write_is_refused(
    tmp_path: Path, mode: int, who: str
) -> None:
    path = tmp_path / "keys"
    write_keys(path, "alice", mode=mode)
    with pytest.raises(ApiKeyFileError) as caught:
        ApiKeys.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert f"lets {who} write it" in message


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o644, 0o444])
def test_a_key_file_only_its_owner_may_write_is_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys"
    write_keys(path, "alice", mode=mode)
    assert [e.name for e in ApiKeys.load(path).entries] == ["alice"]


def test_changes_name_keys_added_removed_and_changed(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write_keys(path, "alice", "bob", "carol")
    old = ApiKeys.load(path)
    alice = next(e for e in old.entries if e.name == "alice")
    _, dave = generate("dave", Role.VIEWER)
    _, carol = generate("carol", Role.OPERATOR)  # a new key, same name
    text = f"alice operator sha256:{alice.digest.hex()}\n{carol}\n{dave}\n"
    replace(path, text)
    changes = KeyChanges.between(old, ApiKeys.load(path))
    assert changes == KeyChanges(added=("dave",), removed=("bob",), changed=("carol",))


async def get_agents(service: RunningService, key: str) -> int:
    response = await service.get("/agents", headers={"Authorization": f"Bearer {key}"})
    await response.content()
    return int(response.code)


def reloader(service: RunningService) -> KeyReloader:
    found = service.top.getServiceNamed("key-reloader")
    assert isinstance(found, KeyReloader)
    return found


@pytest_twisted.ensureDeferred
async def test_a_revoked_key_is_refused_on_the_same_connection(
    start_service: StartService, tmp_path: Path, logs: LogCapture
) -> None:
    path = tmp_path / "keys"
    keys = write_keys(path, "alice", "bob")
    service = await start_service(api_keys_file=path)
    # one persistent connection for every request below
    service.pool.maxPersistentPerHost = 1
    assert await get_agents(service, keys["bob"]) == 200
    assert await get_agents(service, keys["alice"]) == 200
    carol = write_keys(path, "alice", "carol")["carol"]
    assert reloader(service).reload()
    assert await get_agents(service, keys["bob"]) == 401
    assert await get_agents(service, carol) == 200
    [line] = [e for e in logs.events if e.get("event") == "API keys reloaded"]
    assert line["removed"] == ["bob"]
    assert line["added"] == ["carol"]
    assert line["changed"] == ["alice"]  # write_keys gave alice a new key
    for key in (*keys.values(), carol):
        assert key not in str(logs.events)


@pytest.mark.parametrize(
    ("text", "mode", "reason"),
    [
        ("alice operator sha256:nothex\n", 0o600, "bad hash"),
        ("# nobody\n", 0o600, "no keys"),
        (None, 0o600, "cannot read"),
        ("KEEP", 0o664, "mode 0664"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_file_on_reload_keeps_the_keys_in_use(
    start_service: StartService,
    tmp_path: Path,
    logs: LogCapture,
    text: str | None,
    mode: int,
    reason: str,
) -> None:
    path = tmp_path / "keys"
    keys = write_keys(path, "alice")
    service = await start_service(api_keys_file=path)
    if text is None:
        path.unlink()
    elif text == "KEEP":
        path.chmod(mode)
    else:
        replace(path, text, mode)
    assert not reloader(service).reload()
    assert await get_agents(service, keys["alice"]) == 200
    errors = [e for e in logs.events if "not reloaded" in str(e.get("event"))]
    assert len(errors) == 1
    assert reason in errors[0]["error"]
    assert errors[0]["path"] == str(path)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_and_does_not_end_the_process(
    start_service: StartService, tmp_path: Path, logs: LogCapture
) -> None:
    path = tmp_path / "keys"
    keys = write_keys(path, "alice")
    service = await start_service(api_keys_file=path)
    write_keys(path, "bob")
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(1000):  # until the reactor has handled the signal
        if "API keys reloaded" in logs.messages():
            break
        await deferLater(reactor, 0.01)
    assert await get_agents(service, keys["alice"]) == 401


@pytest_twisted.ensureDeferred
async def test_without_a_key_file_sighup_reloads_nothing(
    service: RunningService, logs: LogCapture
) -> None:
    assert not reloader(service).reload()
    assert "SIGHUP: no API key file in use, nothing to reload" in logs.messages()
    assert reactor.running
