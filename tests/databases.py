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
