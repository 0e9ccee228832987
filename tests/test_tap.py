"""The twistd plugin's options and service tree, in process."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import MultiService

from optiinfra import logs, tap
from optiinfra.settings import Settings
from optiinfra.web.service import HTTPService


@pytest.fixture
def stdout(monkeypatch: pytest.MonkeyPatch) -> io.BytesIO:
    stream = io.BytesIO()
    monkeypatch.setattr(tap, "real_stdout", lambda: stream)
    monkeypatch.setattr(logs, "real_stdout", lambda: stream)
    return stream


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in ("ORCHESTRATOR_PORT", "LOG_LEVEL", "DRAIN_TIMEOUT", "ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_options_build_settings_and_choose_the_json_logger() -> None:
    parent: dict[str, Any] = {"logger": None}
    options = tap.Options()
    options.parent = parent  # type: ignore[assignment]
    options.parseOptions(
        ["--port", "9999", "--drain-timeout", "3", "--log-level", "warn"]
    )
    assert options.settings.port == "tcp:9999"
    assert options.settings.drain_timeout == 3.0
    assert parent["logger"] == "optiinfra.logs.stdout_observer"
    observer = logs.stdout_observer()
    assert isinstance(observer, logs.JsonLogObserver)


def test_an_explicit_logger_is_respected() -> None:
    parent: dict[str, Any] = {"logger": "my.observer"}
    options = tap.Options()
    options.parent = parent  # type: ignore[assignment]
    options.parseOptions([])
    assert parent["logger"] == "my.observer"


def test_bad_option_exits_with_one_json_line(
    stdout: io.BytesIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as exited:
        tap.Options().parseOptions([])
    assert exited.value.code == 2
    [line] = stdout.getvalue().splitlines()
    record = json.loads(line)
    assert record["setting"] == "LOG_LEVEL"
    assert record["message"].startswith("invalid setting LOG_LEVEL='loud'")


@pytest_twisted.ensureDeferred
async def test_make_service_builds_the_tree() -> None:
    options = tap.Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
    service = tap.makeService(options)
    try:
        assert isinstance(service, MultiService)
        assert isinstance(service.getServiceNamed("http"), HTTPService)
        assert service.getServiceNamed("systemd") is not None
        assert Path("var/orchestrator.db").is_file()  # noqa: ASYNC240
    finally:
        store = service.getServiceNamed("store")
        store.startService()
        await store.stopService()


def test_make_service_rejects_an_unknown_endpoint(stdout: io.BytesIO) -> None:
    options = tap.Options()
    options.settings = Settings(port="nosuchkind:1")
    with pytest.raises(SystemExit):
        tap.makeService(options)
    assert b"ORCHESTRATOR_PORT" in stdout.getvalue()


def test_tune_gc_freezes_start_up_objects() -> None:
    import gc

    before = gc.get_threshold()
    try:
        tap.tune_gc()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_make_service_refuses_a_bad_plan_template_file(
    stdout: io.BytesIO, tmp_path: Path
) -> None:
    templates = tmp_path / "plans.json"
    templates.write_text('{"scale_up": [{"critical": true}]}')
    options = tap.Options()
    options.settings = Settings(
        port="tcp:0", state_dir=tmp_path, plan_templates_file=templates
    )
    with pytest.raises(SystemExit) as exited:
        tap.makeService(options)
    assert exited.value.code == 2
    line = stdout.getvalue()
    assert b"PLAN_TEMPLATES_FILE" in line
    assert b"scale_up[0].task_type" in line
