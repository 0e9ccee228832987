"""
Random and near-valid coordination requests: every answer is a 200 or a 400 that
names the field at fault, never a 500, and a refused request stores nothing.

Hypothesis runs in a worker thread and sends each request through the reactor
with C{blockingCallFromThread} (see L{tests.test_registry_fuzz} for why).
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThread

from optiinfra.coordination.model import Recommendation

from .conftest import RunningService

EXAMPLES = int(os.environ.get("OPTIINFRA_FUZZ_EXAMPLES", "150"))

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
#: Every field a recommendation may carry.
FIELDS = tuple(field.name for field in attrs.fields(Recommendation))
#: Values that are nearly right: the right type, the wrong content.
NEAR = st.sampled_from(
    [
        "",
        " ",
        "x" * 2000,
        "a\x00b",
        "2026-13-01T00:00:00Z",
        "2026-01-01T00:00:00",
        {"start": "2026-01-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"},
        ["ok", 3],
        ["a b"],
        ["x"] * 300,
        -1,
        16,
        1.5,
        True,
        "critical",
        "cost",
        "r0",
    ]
)


def valid(index: int) -> dict[str, Any]:
    return {
        "id": f"r{index}",
        "agent_type": ("cost", "performance", "resource", "application")[index % 4],
        "action": ("scale_up", "scale_down", "right_size")[index % 3],
        "risk_level": "low",
        "affected_resources": [f"cluster/node-{index % 2}"],
        "dependencies": [f"r{index - 1}"] if index % 3 == 2 else [],
        "window": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"},
    }


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    recs = [valid(i) for i in range(draw(st.integers(1, 4)))]
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.integers(0, len(recs) - 1))
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            recs[target][field] = draw(JSON | NEAR)
        else:
            recs[target].pop(field, None)
    body: dict[str, Any] = {"customer_id": "acme", "recommendations": recs}
    if draw(st.integers(0, 4)) == 0:
        key = draw(
            st.sampled_from(
                [
                    "customer_id",
                    "auto_approve",
                    "execute_now",
                    "metadata",
                    "recommendations",
                ]
            )
        )
        body[key] = draw(JSON | NEAR)
    return body


@pytest_twisted.ensureDeferred
async def test_coordination_survives_fuzzing(service: RunningService) -> None:
    seen: dict[int, int] = {}

    async def send(body: dict[str, Any]) -> tuple[int, Any]:
        response = await service.request("POST", "/coordination/coordinate", json=body)
        return response.code, await response.json()

    async def approvals() -> int:
        response = await service.get("/coordination/approvals")
        assert response.code == 200
        return int((await response.json())["count"])

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batches())
    def fuzz(body: dict[str, Any]) -> None:
        before = blockingCallFromThread(reactor, lambda: ensureDeferred(approvals()))
        code, answer = blockingCallFromThread(
            reactor, lambda: ensureDeferred(send(body))
        )
        seen[code] = seen.get(code, 0) + 1
        assert code in (200, 400), (body, answer)
        if code == 400:
            assert answer["field"], answer
            assert answer["detail"], answer
            after = blockingCallFromThread(reactor, lambda: ensureDeferred(approvals()))
            assert after == before  # a refused request stores nothing
        else:
            kept = {r["id"] for r in answer["recommendations"]}
            dropped = {d["id"] for d in answer["dropped"]}
            assert not kept & dropped
            assert len(kept | dropped) == answer["total_recommendations"]

    done: Deferred[None] = deferToThread(fuzz)
    await done
    # the strategies reach both kinds of answer
    assert seen.get(200, 0) > EXAMPLES // 10, seen
    assert seen.get(400, 0) > EXAMPLES // 10, seen
