"""Where the store tests find their databases: a temp SQLite file, a real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

POSTGRES_URL = os.environ.get(
    "OPTIINFRA_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
#: CI sets this: there a missing PostgreSQL is a failure, not a skip.
REQUIRE_POSTGRES = os.environ.get("OPTIINFRA_REQUIRE_POSTGRES") == "1"


def postgres_or_skip() -> str:
    """The test database's URL, or skip (locally) / fail (CI) when none answers."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        reason = f"no PostgreSQL at {POSTGRES_URL}: {error}".strip()
        if REQUIRE_POSTGRES:
            pytest.fail(reason)
        pytest.skip(reason)
    return POSTGRES_URL


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped afterwards."""
    url = postgres_or_skip()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in url else "?"
    try:
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def sqlite_path(directory: Path) -> Path:
    return directory / "orchestrator.db"


@contextmanager
def postgres_database() -> Iterator[tuple[str, str]]:
    """A whole database of its own (url, name), for tests that cut it off."""
    url = postgres_or_skip()
    name = f"optiinfra_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, query = url.partition("?")
    own = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    try:
        yield own, name
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cut_off(name: str, allowed: bool) -> None:
    """Refuse (or allow again) connections to database C{name}, dropping live ones."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(
            f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'
        )
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
