"""
C{make contract}: schemathesis against a real C{twistd}, with keys.

Starts the service on a free port with a key file holding an operator, a
viewer and an agent key, then runs C{schemathesis run} on its own
C{/openapi.json} with every check and every phase (stateful included), as the
operator.  The exit status is schemathesis's: any failure fails the build.

    python -m tests.contract.run                  # CI: fixed seed, bounded
    python -m tests.contract.run --seed random --max-examples 200 --coverage
    python -m tests.contract.run --open           # the same, without API keys
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from optiinfra.auth import Role, generate
from tests.integration.twistd import ROOT, Twistd

#: CI's seed, so a red run can be replayed exactly.
CI_SEED = 12
#: The phases of CI's run: every check, the stateful phase on.  The coverage
#: phase (every boundary of every field, deterministic) takes ~7 minutes on
#: two cores, over CI's budget: ``--coverage`` adds it, for the local run.
PHASES = "examples,fuzzing,stateful"
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def _key_file(directory: Path) -> dict[str, str]:
    """Write one key of each role; return the keys by role."""
    keys: dict[str, str] = {}
    lines = []
    for role in (Role.OPERATOR, Role.VIEWER, Role.AGENT):
        key, line = generate(f"contract-{role.value}", role)
        keys[role.value] = key
        lines.append(line)
    path = directory / "api-keys"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return keys


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.contract.run")
    parser.add_argument("--seed", default=str(CI_SEED), help="a number, or 'random'")
    parser.add_argument("--max-examples", type=int, default=15)
    parser.add_argument("--max-time", type=int, default=None)
    parser.add_argument("--role", default=Role.OPERATOR.value)
    parser.add_argument(
        "--coverage", action="store_true", help="add the coverage phase"
    )
    parser.add_argument(
        "--open", action="store_true", help="an instance without API keys"
    )
    parser.add_argument("extra", nargs="*", help="passed on to schemathesis run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    with tempfile.TemporaryDirectory(prefix="optiinfra-contract-") as tmp:
        directory = Path(tmp)
        keys = _key_file(directory)
        environment = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.contract.hooks",
            **({} if args.open else {"CONTRACT_KEY_NAME": f"contract-{args.role}"}),
        }
        service = Twistd(
            "--port",
            "tcp:0:interface=127.0.0.1",
            env={
                **({} if args.open else {"API_KEYS_FILE": str(directory / "api-keys")}),
                "STATE_DIR": str(directory),
            },
        )
        try:
            port = service.port()
            command = [
                SCHEMATHESIS,
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "all",
                "--phases",
                PHASES + (",coverage" if args.coverage else ""),
                "--max-examples",
                str(args.max_examples),
                *(
                    []
                    if args.open
                    else ["--header", f"Authorization: Bearer {keys[args.role]}"]
                ),
                "--workers",
                "2",
                "--request-timeout",
                "10",
                *([] if args.seed == "random" else ["--seed", args.seed]),
                *([] if args.max_time is None else ["--max-time", str(args.max_time)]),
                *args.extra,
            ]
            return subprocess.run(
                command, check=False, cwd=ROOT, env=environment
            ).returncode
        finally:
            service.kill()


if __name__ == "__main__":
    raise SystemExit(main())
