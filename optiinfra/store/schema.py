"""
Versioned schema migrations, as data.

Each migration runs once, in order, inside the start-up transaction that records
it in C{schema_migrations}; the SQL is common to SQLite and PostgreSQL.  JSON
documents are stored as text in both, so the store reads them the same way.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Final

import attrs

from optiinfra.store.interface import StoreError, Transaction


@attrs.frozen
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    #: Work SQL common to both databases cannot express, run after the statements.
    convert: Callable[[Transaction], None] | None = None


_HEX: Final = re.compile(r"[0-9a-f]+")
#: The length at which hashes were cut before version 8 (2 KB, in hex).
_CUT: Final = 4096


def _hex_bodies_to_sha256(tx: Transaction) -> None:
    """
    Idempotency keys stored before version 8 hold the hex of their request's
    sorted JSON, cut at 2 KB; since then, its SHA-256.  Whole bodies (almost
    all) are hashed now, so a replay of one still matches.  Cut ones cannot
    be: they are marked, and a replay of one is answered 409 (its body was
    never recorded whole).  Plan steps' own keys (not hex) are left alone.
    """
    for table in ("tasks", "coordinations"):
        rows = tx.execute(
            f"SELECT idempotency_key, request_hash FROM {table}"
            " WHERE request_hash IS NOT NULL"
        )
        changed = []
        for key, old in rows:
            if len(old) % 2 or not _HEX.fullmatch(old):
                continue
            body = bytes.fromhex(old)
            digest = hashlib.sha256(body).hexdigest()
            changed.append((digest if len(old) < _CUT else f"cut:{digest}", key))
        if changed:
            tx.executemany(
                f"UPDATE {table} SET request_hash = ? WHERE idempotency_key = ?",
                changed,
            )


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "agents",
        (
            """
            CREATE TABLE agents (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                type TEXT NOT NULL,
                host TEXT NOT NULL,
                port INTEGER NOT NULL,
                capabilities TEXT NOT NULL,
                status TEXT NOT NULL,
                version TEXT NOT NULL,
                registered_at DOUBLE PRECISION NOT NULL,
                last_seen DOUBLE PRECISION NOT NULL,
                metadata TEXT NOT NULL,
                endpoint TEXT,
                health_check_endpoint TEXT
            )
            """,
            "CREATE UNIQUE INDEX agents_identity ON agents (name, host, port)",
            "CREATE INDEX agents_type ON agents (type)",
            "CREATE INDEX agents_last_seen ON agents (last_seen)",
        ),
    ),
    Migration(
        2,
        "tasks",
        (
            """
            CREATE TABLE tasks (
                id TEXT PRIMARY KEY,
                task_type TEXT NOT NULL,
                agent_type TEXT NOT NULL,
                parameters TEXT NOT NULL,
                priority INTEGER NOT NULL,
                timeout_seconds DOUBLE PRECISION NOT NULL,
                max_retries INTEGER NOT NULL,
                metadata TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                deadline DOUBLE PRECISION NOT NULL,
                requested_agent TEXT,
                agent_id TEXT,
                result TEXT,
                error TEXT,
                started_at DOUBLE PRECISION,
                completed_at DOUBLE PRECISION,
                retry_count INTEGER NOT NULL,
                not_before DOUBLE PRECISION NOT NULL,
                owner TEXT,
                lease_until DOUBLE PRECISION,
                idempotency_key TEXT UNIQUE,
                request_hash TEXT,
                traceparent TEXT,
                request_id TEXT,
                tried TEXT NOT NULL
            )
            """,
            "CREATE INDEX tasks_waiting ON tasks (status, priority, created_at)",
            "CREATE INDEX tasks_finished ON tasks (completed_at)",
            """
            CREATE TABLE task_events (
                task_id TEXT NOT NULL,
                status TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                detail TEXT
            )
            """,
            "CREATE INDEX task_events_task ON task_events (task_id, at)",
        ),
    ),
    # Listing 10,000 agents formatted two timestamps per row on every read;
    # written once with each change instead.  Rows from before keep NULL here
    # and are formatted on read until they next change.
    Migration(
        3,
        "agents: timestamps as text",
        (
            "ALTER TABLE agents ADD COLUMN registered_at_text TEXT",
            "ALTER TABLE agents ADD COLUMN last_seen_text TEXT",
        ),
    ),
    Migration(
        4,
        "coordination",
        (
            """
            CREATE TABLE coordinations (
                id TEXT PRIMARY KEY,
                customer_id TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                document TEXT NOT NULL,
                idempotency_key TEXT UNIQUE,
                request_hash TEXT
            )
            """,
            "CREATE INDEX coordinations_created ON coordinations (created_at)",
            """
            CREATE TABLE approvals (
                id TEXT PRIMARY KEY,
                coordination_id TEXT NOT NULL,
                customer_id TEXT NOT NULL,
                recommendation_id TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                version INTEGER NOT NULL,
                document TEXT NOT NULL
            )
            """,
            "CREATE INDEX approvals_customer ON approvals (customer_id, created_at)",
            "CREATE INDEX approvals_open ON approvals (status, expires_at)",
            "CREATE INDEX approvals_coordination ON approvals (coordination_id)",
            """
            CREATE TABLE plans (
                id TEXT PRIMARY KEY,
                coordination_id TEXT NOT NULL,
                customer_id TEXT NOT NULL,
                recommendation_id TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                version INTEGER NOT NULL,
                document TEXT NOT NULL
            )
            """,
            "CREATE INDEX plans_status ON plans (status)",
            "CREATE INDEX plans_coordination ON plans (coordination_id)",
        ),
    ),
    # The change feed's window (optiinfra.store.events): one row per change,
    # ids handed out by the one row of event_sequence, whose lock orders the
    # commits of every replica as their ids are.
    Migration(
        5,
        "events",
        (
            """
            CREATE TABLE events (
                id BIGINT PRIMARY KEY,
                at DOUBLE PRECISION NOT NULL,
                topic TEXT NOT NULL,
                kind TEXT NOT NULL,
                labels TEXT NOT NULL,
                document TEXT NOT NULL
            )
            """,
            "CREATE INDEX events_at ON events (at)",
            """
            CREATE TABLE event_sequence (
                one INTEGER PRIMARY KEY,
                last_id BIGINT NOT NULL,
                purged_through BIGINT NOT NULL
            )
            """,
            "INSERT INTO event_sequence (one, last_id, purged_through)"
            " VALUES (1, 0, 0)",
        ),
    ),
    # Every status change of every task moved its entry in both indexes, and
    # a task created already sent wrote a page of each for nothing: now they
    # hold only the tasks their queries look for (waiting; finished; in
    # flight).  Fewer pages written per task, a smaller write-ahead log.
    Migration(
        6,
        "tasks: partial indexes",
        (
            "DROP INDEX tasks_waiting",
            "CREATE INDEX tasks_waiting ON tasks (priority DESC, created_at, id)"
            " WHERE status IN ('pending', 'queued', 'retrying')",
            "DROP INDEX tasks_finished",
            "CREATE INDEX tasks_finished ON tasks (completed_at)"
            " WHERE completed_at IS NOT NULL",
            # What lease recovery looks for, four times a second.
            "CREATE INDEX tasks_in_flight ON tasks (lease_until)"
            " WHERE status IN ('sent', 'running')",
        ),
    ),
    # PostgreSQL flushes its log at a commit only when the transaction wrote
    # to it; the durability barrier (PostgresBackend.sync) writes this row.
    Migration(
        7,
        "durability barrier",
        (
            "CREATE TABLE store_sync (id INTEGER PRIMARY KEY, flushes BIGINT NOT NULL)",
            "INSERT INTO store_sync (id, flushes) VALUES (1, 0)",
        ),
    ),
    Migration(
        8,
        "idempotency: request hashes are SHA-256",
        (),
        _hex_bodies_to_sha256,
    ),
)

LATEST: Final = MIGRATIONS[-1].version


def migrate(tx: Transaction) -> list[int]:
    """Apply the migrations this database lacks; the versions applied."""
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY,"
        " name TEXT NOT NULL,"
        " applied_at DOUBLE PRECISION NOT NULL)"
    )
    [(current,)] = tx.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    if current > LATEST:
        raise StoreError(
            f"database schema is at version {current}, newer than this build's "
            f"{LATEST}: run a newer orchestrator"
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        for statement in migration.statements:
            tx.execute(statement)
        if migration.convert is not None:
            migration.convert(tx)
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at)"
            " VALUES (?, ?, ?)",
            (migration.version, migration.name, time.time()),
        )
        applied.append(migration.version)
    return applied
