"""A database lost while running: 503 and not ready, then back, nothing lost."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from ..conftest import RunningService, StartService
from ..databases import cut_off, postgres_database

AGENT = {"name": "a", "type": "cost", "host": "h", "port": 1, "capabilities": []}


@pytest.fixture
def database() -> Iterator[tuple[str, str]]:
    with postgres_database() as created:
        yield created


async def ready(service: RunningService) -> int:
    response = await service.get("/readyz")
    await response.content()
    return int(response.code)


async def wait_for_readyz(service: RunningService, code: int) -> None:
    for _ in range(200):
        if await ready(service) == code:
            return
        await deferLater(reactor, 0.1)
    raise AssertionError(f"/readyz never answered {code}")


@pytest_twisted.ensureDeferred
async def test_losing_the_database_is_503_until_it_returns(
    start_service: StartService, database: tuple[str, str]
) -> None:
    url, name = database
    service = await start_service(database_url=url)
    response = await service.request("POST", "/agents/register", json=AGENT)
    agent_id = (await response.json())["agent_id"]

    cut_off(name, allowed=False)
    response = await service.request("POST", f"/agents/{agent_id}/heartbeat", json={})
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["5"]
    body = await response.json()
    assert body["error"] == "storage unavailable, try again later"
    assert "request_id" in body
    await wait_for_readyz(service, 503)
    reasons = await (await service.get("/readyz")).json()
    assert "store" in reasons["reasons"]
    assert (await service.get("/health")).code == 200  # the process is alive

    cut_off(name, allowed=True)
    await wait_for_readyz(service, 200)
    response = await service.request("POST", f"/agents/{agent_id}/heartbeat", json={})
    assert response.code == 200
    listing = await (await service.get("/agents")).json()
    assert [a["id"] for a in listing["agents"]] == [agent_id]
