"""
The coordination half of the store: results, approvals and plans, over any
backend.

Approvals and plans are JSON documents with their status, version and the
columns they are looked up by beside them.  Every change names the version it
read and succeeds only if nobody changed the row since: two replicas, or a
replica and a person clicking twice, can never both move the same approval or
plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import orjson
from twisted.internet.defer import Deferred

from optiinfra.coordination.approvals import EXPIRED, PENDING, Approval, expire
from optiinfra.coordination.codec import (
    decode_approval,
    decode_plan,
    encode_approval,
    encode_plan,
)
from optiinfra.coordination.plans import ACTIVE, Plan
from optiinfra.store.interface import IBackend, Transaction

_APPROVAL: Final = "SELECT document, version FROM approvals"
_PLAN: Final = "SELECT document, version FROM plans"


def _approvals(rows: list[tuple[Any, ...]]) -> list[Approval]:
    return [decode_approval(text, version) for text, version in rows]


def _plans(rows: list[tuple[Any, ...]]) -> list[Plan]:
    return [decode_plan(text, version) for text, version in rows]


def _insert_approval(tx: Transaction, approval: Approval) -> None:
    tx.execute(
        "INSERT INTO approvals (id, coordination_id, customer_id, recommendation_id,"
        " status, created_at, expires_at, version, document)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
        (
            approval.id,
            approval.coordination_id,
            approval.customer_id,
            approval.recommendation.id,
            approval.status,
            approval.created_at,
            approval.expires_at,
            encode_approval(approval),
        ),
    )


def _insert_plan(tx: Transaction, plan: Plan) -> None:
    tx.execute(
        "INSERT INTO plans (id, coordination_id, customer_id, recommendation_id,"
        " status, created_at, version, document) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
        (
            plan.id,
            plan.coordination_id,
            plan.customer_id,
            plan.recommendation.id,
            plan.status,
            plan.created_at,
            encode_plan(plan),
        ),
    )


def _update_approval(tx: Transaction, approval: Approval) -> Approval | None:
    rows = tx.execute(
        "UPDATE approvals SET status = ?, document = ?, version = version + 1"
        " WHERE id = ? AND version = ? RETURNING version",
        (approval.status, encode_approval(approval), approval.id, approval.version),
    )
    if not rows:
        return None
    return attrs.evolve(approval, version=rows[0][0])


class CoordinationStore:
    """Coordination on a backend; used by L{optiinfra.store.sql.SQLStore}."""

    def __init__(self, backend: IBackend) -> None:
        self._backend = backend

    def save_result(
        self,
        coordination_id: str,
        customer_id: str,
        created_at: float,
        document: Mapping[str, Any],
        approvals: Sequence[Approval],
        plans: Sequence[Plan],
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> Deferred[tuple[dict[str, Any], str | None] | None]:
        """
        Store one coordination's result, its approvals and plans, together.
        With an C{idempotency_key} already used, store nothing and fire with
        the result stored under it and its request's hash; else None.
        """

        def earlier(tx: Transaction) -> tuple[dict[str, Any], str | None] | None:
            rows = tx.execute(
                "SELECT document, request_hash FROM coordinations"
                " WHERE idempotency_key = ?",
                (idempotency_key,),
            )
            return (orjson.loads(rows[0][0]), rows[0][1]) if rows else None

        def save(tx: Transaction) -> tuple[dict[str, Any], str | None] | None:
            if idempotency_key is not None:
                found = earlier(tx)
                if found is not None:
                    return found
            inserted = tx.execute(
                "INSERT INTO coordinations (id, customer_id, created_at, document,"
                " idempotency_key, request_hash) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                (
                    coordination_id,
                    customer_id,
                    created_at,
                    orjson.dumps(document).decode(),
                    idempotency_key,
                    request_hash,
                ),
            )
            if not inserted:  # stored by another request since the look above
                return earlier(tx)
            for approval in approvals:
                _insert_approval(tx, approval)
            for plan in plans:
                _insert_plan(tx, plan)
            return None

        return self._backend.run(save)

    def get_result(self, coordination_id: str) -> Deferred[dict[str, Any] | None]:
        def get(tx: Transaction) -> dict[str, Any] | None:
            rows = tx.execute(
                "SELECT document FROM coordinations WHERE id = ?", (coordination_id,)
            )
            return orjson.loads(rows[0][0]) if rows else None

        return self._backend.run(get, write=False)

    # Approvals ----------------------------------------------------------------

    def get_approval(self, approval_id: str) -> Deferred[Approval | None]:
        def get(tx: Transaction) -> Approval | None:
            found = _approvals(tx.execute(f"{_APPROVAL} WHERE id = ?", (approval_id,)))
            return found[0] if found else None

        return self._backend.run(get, write=False)

    def list_approvals(
        self,
        now: float,
        customer_id: str | None = None,
        status: str | None = None,
        coordination_id: str | None = None,
        limit: int = 500,
        offset: int = 0,
    ) -> Deferred[list[Approval]]:
        """
        Approvals, newest first.  A pending approval past its expiry counts as
        expired here, whether or not the sweep has recorded it yet.
        """
        conditions: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("customer_id", customer_id),
            ("coordination_id", coordination_id),
        ):
            if value is not None:
                conditions.append(f"{column} = ?")
                params.append(value)
        if status == PENDING:
            conditions.append("status = ? AND expires_at > ?")
            params.extend((PENDING, now))
        elif status == EXPIRED:
            conditions.append("(status = ? OR (status = ? AND expires_at <= ?))")
            params.extend((EXPIRED, PENDING, now))
        elif status is not None:
            conditions.append("status = ?")
            params.append(status)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""

        def list_(tx: Transaction) -> list[Approval]:
            return _approvals(
                tx.execute(
                    f"{_APPROVAL}{where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                    (*params, limit, offset),
                )
            )

        return self._backend.run(list_, write=False)

    def change_approval(
        self, approval: Approval, plan: Plan | None = None
    ) -> Deferred[Approval | None]:
        """
        Store C{approval} over the version it was read at, and C{plan} with it;
        None (and nothing stored) when the approval changed meanwhile.
        """

        def change(tx: Transaction) -> Approval | None:
            changed = _update_approval(tx, approval)
            if changed is not None and plan is not None:
                _insert_plan(tx, plan)
            return changed

        return self._backend.run(change)

    def expire_approvals(self, now: float) -> Deferred[list[Approval]]:
        """Record the expiry of pending approvals past their time; those changed."""
        lock = self._backend.lock_suffix()

        def expire_due(tx: Transaction) -> list[Approval]:
            due = _approvals(
                tx.execute(
                    f"{_APPROVAL} WHERE status = ? AND expires_at <= ?{lock}",
                    (PENDING, now),
                )
            )
            changed = []
            for approval in due:
                done = _update_approval(tx, expire(approval))
                if done is not None:
                    changed.append(done)
            return changed

        return self._backend.run(expire_due)

    # Plans --------------------------------------------------------------------

    def purge_done(self, before: float, limit: int = 100) -> Deferred[int]:
        """
        Forget up to C{limit} coordinations made before C{before} whose plans
        are all finished or never started (their approvals have long expired
        or been decided); how many.  Active plans are never forgotten.
        """
        active = ", ".join("?" * len(ACTIVE))

        def purge(tx: Transaction) -> int:
            rows = tx.execute(
                "SELECT id FROM coordinations c WHERE created_at < ? AND NOT EXISTS"
                f" (SELECT 1 FROM plans p WHERE p.coordination_id = c.id"
                f" AND p.status IN ({active})) ORDER BY created_at LIMIT ?",
                (before, *ACTIVE, limit),
            )
            if not rows:
                return 0
            condition, params = self._backend.in_list(
                "coordination_id", [row[0] for row in rows]
            )
            tx.execute(f"DELETE FROM approvals WHERE {condition}", params)
            tx.execute(f"DELETE FROM plans WHERE {condition}", params)
            condition, params = self._backend.in_list("id", [row[0] for row in rows])
            tx.execute(f"DELETE FROM coordinations WHERE {condition}", params)
            return len(rows)

        return self._backend.run_relaxed(purge)  # found again if a power cut undoes it

    def get_plan(self, plan_id: str) -> Deferred[Plan | None]:
        def get(tx: Transaction) -> Plan | None:
            found = _plans(tx.execute(f"{_PLAN} WHERE id = ?", (plan_id,)))
            return found[0] if found else None

        return self._backend.run(get, write=False)

    def plans_of(self, coordination_id: str) -> Deferred[list[Plan]]:
        def list_(tx: Transaction) -> list[Plan]:
            return _plans(
                tx.execute(
                    f"{_PLAN} WHERE coordination_id = ? ORDER BY created_at, id",
                    (coordination_id,),
                )
            )

        return self._backend.run(list_, write=False)

    def plans_in(self, statuses: Sequence[str]) -> Deferred[list[Plan]]:
        condition, params = self._backend.in_list("status", statuses)

        def list_(tx: Transaction) -> list[Plan]:
            return _plans(
                tx.execute(f"{_PLAN} WHERE {condition} ORDER BY created_at", params)
            )

        return self._backend.run(list_, write=False)

    def change_plan(self, plan: Plan) -> Deferred[Plan | None]:
        """Store C{plan} over the version it was read at; None when it changed."""

        def change(tx: Transaction) -> Plan | None:
            rows = tx.execute(
                "UPDATE plans SET status = ?, document = ?, version = version + 1"
                " WHERE id = ? AND version = ? RETURNING version",
                (plan.status, encode_plan(plan), plan.id, plan.version),
            )
            return attrs.evolve(plan, version=rows[0][0]) if rows else None

        return self._backend.run(change)
