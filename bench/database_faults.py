"""
What a replica does when its PostgreSQL is frozen, stopped and started again,
measured with the default STORE_TIMEOUT and DRAIN_TIMEOUT on a cluster of its
own (initdb/pg_ctl in a temporary directory; the shared one is not touched).

    .venv/bin/python bench/database_faults.py

Prints one line per figure (seconds): the README's "What a crashed, stalled or
lost database does" quotes them.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _shared import table  # noqa: E402

from tests.integration.test_database_faults import AGENT, call  # noqa: E402
from tests.integration.twistd import Twistd  # noqa: E402
from tests.pgcluster import PrivateCluster, postgres_bin  # noqa: E402


def timed_calls(port: int, count: int) -> list[tuple[int, float]]:
    began = time.monotonic()

    def one(_: int) -> tuple[int, float]:
        code = call(port, "GET", "/agents")[0]
        return code, time.monotonic() - began

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def until_ready(port: int, code: int, since: float) -> float:
    while call(port, "GET", "/readyz")[0] != code:
        time.sleep(0.02)
    return time.monotonic() - since


def answered(answers: list[tuple[int, float]]) -> str:
    codes = sorted({code for code, _ in answers})
    seconds = [at for _, at in answers]
    return (
        f"{len(answers)} requests answered {codes}"
        f" after {min(seconds):.2f} .. {max(seconds):.2f} s"
    )


def main() -> None:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL server programs installed")
    directory = Path(tempfile.mkdtemp(prefix="optiinfra-pg-"))
    cluster = PrivateCluster(bin_dir, directory)
    cluster.start()
    process = Twistd(
        "--port", "tcp:0:interface=127.0.0.1", env={"DATABASE_URL": cluster.url}
    )
    try:
        port = process.port()
        call(port, "POST", "/agents/register", AGENT)
        row = table("A replica and its database's faults", "database 28|what it saw 0")

        cluster.freeze()
        frozen = time.monotonic()
        row(("frozen", answered(timed_calls(port, 5))))
        row(("frozen", f"/readyz 503 after {until_ready(port, 503, frozen):.2f} s"))
        cluster.thaw()
        thawed = until_ready(port, 200, time.monotonic())
        row(("thawed", f"/readyz 200 after {thawed:.2f} s"))

        cluster.stop()
        stopped = time.monotonic()
        row(("stopped (first requests)", answered(timed_calls(port, 16))))
        row(("stopped", f"/readyz 503 after {until_ready(port, 503, stopped):.2f} s"))
        row(("stopped (known down)", answered(timed_calls(port, 16))))
        cluster.start()  # returns once it accepts connections
        back = time.monotonic()
        while call(port, "GET", "/agents")[0] != 200:
            time.sleep(0.02)
        again = time.monotonic() - back
        row(("started", f"requests answered again after {again:.2f} s"))

        cluster.freeze()
        with ThreadPoolExecutor(5) as pool:  # requests waiting on the database
            waiting = [pool.submit(call, port, "GET", "/agents") for _ in range(5)]
            time.sleep(0.5)
            stopping = time.monotonic()
            process.signal(signal.SIGTERM)
            process.wait(120)
            row(
                (
                    "frozen, 5 requests waiting",
                    f"SIGTERM to exit {time.monotonic() - stopping:.2f} s, the "
                    f"requests answered {sorted({w.result()[0] for w in waiting})}",
                )
            )
    finally:
        process.kill()
        if cluster.running:
            cluster.crash()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
