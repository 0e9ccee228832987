"""
Baseline for tasks: a bare Klein app that relays each C{POST /tasks} to an
agent with one treq call, no store, no routing, no logging, no metrics.

    python bench/baseline_relay.py --port 8084 --agent-port 9001

The project must use Klein for its HTTP API and treq for its calls to agents;
this is the least a task can cost with that stack: accept the POST with Klein,
read its JSON body (orjson), make a task id (uuid4), make one call
C{POST http://127.0.0.1:AGENT_PORT/task} with the agent contract's body, read
the agent's JSON answer and answer 201 C{{"task_id": ..., "status": ...}} with
the agent's status (C{Content-Type} and C{Content-Length} set).  Its tasks/s
is the rate no orchestrator built on Klein + treq can exceed on the same
machine.  The call is made the plain way a treq user would (a URL string, a
dict of headers, bytes as data) through one C{treq.client.HTTPClient} over a
persistent C{HTTPConnectionPool} (up to 64 kept connections to the agent).

C{GET /health} is there for the harness's readiness check.  Started by
bench/tasks.py; runnable on its own for poking at it.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import orjson
from _shared import health_body, json_response, parse_args, serve
from klein import Klein
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.server import Site

_HEADERS = {"Content-Type": "application/json"}


def _agent_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agent-port",
        type=int,
        required=True,
        help="the agent's port on 127.0.0.1: every task is sent there",
    )


def main() -> None:
    args = parse_args("bare Klein + treq relay baseline for tasks", _agent_port)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    client = HTTPClient(Agent(reactor, pool=pool))
    agent_url = f"http://127.0.0.1:{args.agent_port}/task"
    app = Klein()
    started = reactor.seconds()

    @app.route("/health", methods=["GET"])
    def health(request: Any) -> bytes:
        return health_body(request, reactor.seconds(), started)

    @app.route("/tasks", methods=["POST"])
    async def submit(request: Any) -> bytes:
        document = orjson.loads(request.content.read())
        task_id = str(uuid.uuid4())
        body = orjson.dumps(
            {
                "task_id": task_id,
                "task_type": document["task_type"],
                "parameters": {},
                "timeout_seconds": 30,
                "priority": 5,
                "metadata": {},
            }
        )
        try:
            response = await client.post(agent_url, data=body, headers=_HEADERS)
        except ResponseNeverReceived as error:
            # The client hung up (wrk stopping) and Klein cancelled the call:
            # said as a cancellation, which Klein does not log.
            if all(reason.check(CancelledError) for reason in error.reasons):
                raise CancelledError() from None
            raise
        answer = orjson.loads(await response.content())
        return json_response(
            request,
            orjson.dumps({"task_id": task_id, "status": answer["status"]}),
            201,
        )

    serve(Site(app.resource()), args)


if __name__ == "__main__":
    main()
