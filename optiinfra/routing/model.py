"""Tasks and their vocabulary, as the contract names them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

#: What a task type may be: the agents' own words for what they offer
#: (C{kv_cache_optimization}), lower-case with underscores.
TASK_TYPE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: The contract's task types (built in) -> the agent type that does each.
TASK_TYPES: Final[Mapping[str, str]] = {
    "analyze_cost": "cost",
    "migrate_to_spot": "cost",
    "right_size": "cost",
    "optimize_kv_cache": "performance",
    "tune_inference": "performance",
    "predict_scaling": "resource",
    "balance_load": "resource",
    "validate_quality": "application",
    "detect_regression": "application",
}

PENDING: Final = "pending"
QUEUED: Final = "queued"
SENT: Final = "sent"
RUNNING: Final = "running"
RETRYING: Final = "retrying"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
TIMEOUT: Final = "timeout"
CANCELLED: Final = "cancelled"

STATUSES: Final = (
    PENDING,
    QUEUED,
    SENT,
    RUNNING,
    COMPLETED,
    FAILED,
    TIMEOUT,
    RETRYING,
    CANCELLED,
)
#: Waiting for an agent (or for the back-off after a failed attempt).
WAITING: Final = (PENDING, QUEUED, RETRYING)
#: Out at an agent.
IN_FLIGHT: Final = (SENT, RUNNING)
FINISHED: Final = (COMPLETED, FAILED, TIMEOUT, CANCELLED)

PRIORITIES: Final[Mapping[str, int]] = {
    "low": 1,
    "normal": 5,
    "high": 10,
    "critical": 15,
}


@attrs.frozen
class Task:
    """One task, as stored."""

    id: str
    task_type: str
    agent_type: str
    parameters: Mapping[str, Any]
    priority: int
    timeout_seconds: float
    max_retries: int
    metadata: Mapping[str, Any]
    status: str
    created_at: float
    deadline: float
    requested_agent: str | None = None
    agent_id: str | None = None
    result: Any = None
    error: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    retry_count: int = 0
    not_before: float = 0.0
    owner: str | None = None
    lease_until: float | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    traceparent: str | None = None
    request_id: str | None = None
    tried: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@attrs.frozen
class TaskEvent:
    """A status change, with its time and why."""

    task_id: str
    status: str
    at: float
    detail: str | None = None


@attrs.frozen
class TaskQuery:
    status: str | None = None
    agent_id: str | None = None
    agent_type: str | None = None
    task_type: str | None = None
    limit: int = 100
    offset: int = 0
