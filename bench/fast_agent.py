"""
A fast local agent for bench/tasks.py, and the paced task client beside it.

    python bench/fast_agent.py --port 9001 --orchestrator 8080

One process, one Twisted reactor, meant to be pinned to the load generator's
CPU.  It

- registers itself with the orchestrator on 127.0.0.1:ORCHESTRATOR
  (``POST /agents/register``: type ``cost``, capability ``analyze_cost``) and
  heartbeats every ``--heartbeat`` seconds, as a real agent does;
- answers every ``POST /task`` at once with
  ``{"task_id":...,"status":"completed","result":{},"execution_time_ms":0}``,
  noting per task when the request reached it and when it answered (the
  agent's own time, to be subtracted from the submit-to-complete latency);
- on demand, submits tasks to the orchestrator (or to another port) at a
  steady rate (an open-loop client over keep-alive connections: each request
  goes out at its scheduled time whether or not earlier ones were answered),
  noting when each was sent and accepted.  Client and agent share this
  process, hence one clock, so the time from sending ``POST /tasks`` to the
  agent receiving the task is exact.

Control (JSON), for the harness:

  GET  /health         200 once registered, with the agent id; 503 before
  GET  /bench/stats    tasks answered, first receipt, last answer, duplicates
  POST /bench/reset    forget the tasks answered so far
  POST /bench/pace     {"rate": 100, "seconds": 10, "body": "...", "connections": 8,
                        "port": 8084, "rows": true, "window": null}
                       starts a paced run (202); 409 while one runs.  "port" is
                       where the tasks go on 127.0.0.1 (optional: the
                       orchestrator's port by default; bench/tasks.py also
                       points it at the bare Klein + treq relay).  "rows":
                       false keeps only counts (for long runs: bench/soak.py).
                       "window": N instead of a rate, a closed loop: a task
                       goes out whenever fewer than N accepted tasks have not
                       yet reached this agent, for "seconds"
  GET  /bench/pace     202 while running (with the answers' status codes so far);
                       200 with one row per task when done

Times are ``time.time()`` (the orchestrator stamps its log lines with the same
clock).  Not a test fixture: it imports nothing from tests/.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, deque
from typing import Any

import orjson
import treq
from _shared import INTERFACE, percentile, serve
from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

_JSON = [b"application/json"]


def _reply(request: Any, document: object, code: int = 200) -> bytes:
    body = orjson.dumps(document)
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", _JSON)
    request.responseHeaders.setRawHeaders(
        b"content-length", [str(len(body)).encode("ascii")]
    )
    return body


# The paced client ---------------------------------------------------------------

#: Seconds a finished paced run waits for the calls of tasks already accepted.
_CALLS_GRACE = 5.0


class _Submitter(Protocol):
    """One keep-alive connection to the orchestrator, one request at a time."""

    def __init__(self, run: PacedRun) -> None:
        self.run = run
        self.buffer = b""
        self.waiting: int | None = None  # the index of the task awaiting its 201
        self.sent_at = 0.0

    def connectionMade(self) -> None:
        self.run.connected(self)

    def send(self, index: int, request: bytes) -> None:
        self.waiting = index
        self.sent_at = time.time()
        if self.run.keep_rows:
            self.run.rows[index][1] = self.sent_at
        self.transport.write(request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].split(b"\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        now = time.time()
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        index, self.waiting = self.waiting, None
        if index is not None:
            code = int(head[0].split(b" ", 2)[1])
            self.run.took.setdefault(code, []).append(now - self.sent_at)
            self.run.answered(self, index, now, code, body)

    def connectionLost(self, reason: Any = None) -> None:
        self.run.lost(self)


class PacedRun:
    """
    C{count} submissions at C{rate} per second, each at its scheduled time.

    Rows: [scheduled, sent, accepted, status code, task id] per task.  A task
    is sent on an idle connection.  When none is idle (C{connections} answers
    outstanding) it waits for one: that wait shows in sent - scheduled and is
    counted in C{waited}, because latency measured from "sent" would hide it.
    """

    def __init__(
        self,
        port: int,
        rate: float,
        count: int,
        body: bytes,
        connections: int,
        keep_rows: bool = True,
        window: int | None = None,
        seconds: float = 0.0,
    ) -> None:
        self.rate = rate
        self.count = count
        self.keep_rows = keep_rows
        #: Closed loop: at most this many accepted tasks not yet at the agent.
        self.window = window
        self.seconds = seconds
        self.reached = 0  # tasks of this run that reached the agent
        self.codes: Counter[int] = Counter()
        #: Status code -> seconds from sending each request to its answer.
        self.took: dict[int, list[float]] = {}
        self.request = (
            f"POST /tasks HTTP/1.1\r\nHost: {INTERFACE}:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.rows: list[list[Any]] = [
            [0.0, None, None, None, None] for _ in range(count if keep_rows else 0)
        ]
        self.idle: deque[_Submitter] = deque()
        self.backlog: deque[int] = deque()
        self.next = 0
        self.outstanding = 0
        self.opened = 0
        self.lost_connections = 0
        self.waited = 0
        self.done = False
        self.done_at = 0.0
        self.start = 0.0
        factory = ClientFactory()
        factory.protocol = lambda: _Submitter(self)  # type: ignore[assignment]
        self._factory = factory
        self._port = port
        self._ready = connections
        for _ in range(connections):
            self._connect()

    def _connect(self) -> None:
        self.opened += 1
        reactor.connectTCP(INTERFACE, self._port, self._factory)

    def connected(self, submitter: _Submitter) -> None:
        self.idle.append(submitter)
        if self._ready:
            self._ready -= 1
            if not self._ready:  # every connection is open: start the clock
                self.start = time.time() + 0.02
                reactor.callLater(0.02, self._tick)
                return
        self._drain_backlog()

    def _tick(self) -> None:
        now = time.time()
        if self.window is not None:
            if now >= self.start + self.seconds:
                self.count = self.next  # no more: the run ends as answers arrive
                self._finish_if_done()
                return
            self._fill()
            reactor.callLater(0.05, self._tick)  # the time limit, if nothing moves
            return
        while self.next < self.count and self.start + self.next / self.rate <= now:
            index = self.next
            self.next += 1
            if self.keep_rows:
                self.rows[index][0] = self.start + index / self.rate
            self.outstanding += 1
            if len(self.backlog) >= len(self.idle):
                self.waited += 1  # no free connection for it
            self.backlog.append(index)
        self._drain_backlog()
        if self.next < self.count:
            due = self.start + self.next / self.rate
            reactor.callLater(max(0.0, due - time.time()), self._tick)

    def _fill(self) -> None:
        """The closed loop: top the window of tasks not yet at the agent up."""
        while self.next - self.reached < (self.window or 0):
            self.next += 1
            self.count = self.next + 1  # open-ended until the time is over
            self.outstanding += 1
            self.backlog.append(self.next - 1)
        self._drain_backlog()

    def seen(self) -> None:
        """A task of this run reached the agent."""
        self.reached += 1
        if self.window is not None and self.count > self.next and self.start:
            self._fill()

    def _drain_backlog(self) -> None:
        while self.backlog and self.idle:
            self.idle.popleft().send(self.backlog.popleft(), self.request)

    def answered(
        self, submitter: _Submitter, index: int, at: float, code: int, body: bytes
    ) -> None:
        self.codes[code] += 1
        if code != 201 and self.window is not None:
            self.reached += 1  # refused: it will never reach the agent
        if self.keep_rows:
            row = self.rows[index]
            row[2], row[3] = at, code
            try:
                row[4] = orjson.loads(body).get("task_id")
            except (orjson.JSONDecodeError, AttributeError):
                row[4] = None
        self.outstanding -= 1
        self.idle.append(submitter)
        self._drain_backlog()
        self._finish_if_done()

    def lost(self, submitter: _Submitter) -> None:
        with_task = submitter.waiting
        if submitter in self.idle:
            self.idle.remove(submitter)
        if self.done:
            return
        self.lost_connections += 1
        if with_task is not None:  # never answered: counted as such
            self.outstanding -= 1
            self.codes[0] += 1
            if self.keep_rows:
                self.rows[with_task][3] = 0
        self._connect()
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if self.next >= self.count and not self.outstanding and not self.done:
            self.done = True
            self.done_at = time.time()
            for submitter in list(self.idle):
                submitter.transport.loseConnection()

    def report(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "count": self.count,
            "connections_opened": self.opened,
            "connections_lost": self.lost_connections,
            "waited_for_connection": self.waited,
            "codes": {str(code): n for code, n in sorted(self.codes.items())},
            "answer_ms": {
                str(code): _percentiles(times) for code, times in self.took.items()
            },
            "rows": self.rows,
        }


# The agent ------------------------------------------------------------------------


class _Channel(HTTPChannel):
    """
    Notes when a request's first bytes arrive, so that the agent's own time
    (subtracted from the latency) includes twisted.web parsing the request.
    The orchestrator sends one request at a time per connection.
    """

    arrived: float | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.arrived is None:
            self.arrived = time.time()
        super().dataReceived(data)


class FastAgent(Resource):
    isLeaf = True

    def __init__(self, orchestrator: int | None, delay: float = 0.0) -> None:
        super().__init__()
        self.orchestrator = orchestrator
        self.delay = delay
        self.agent_id: str | None = None
        self.problem: str | None = None
        self.pace: PacedRun | None = None
        self.reset()

    def reset(self) -> None:
        #: task id -> (received, answered)
        self.tasks: dict[str, tuple[float, float]] = {}
        self.duplicates = 0
        self.first_received: float | None = None
        self.last_answered: float | None = None

    # POST /task is the hot path: read, answer, note the two times.
    def render_POST(self, request: Any) -> bytes:
        if request.path == b"/task":
            # When its first bytes arrived (see _Channel), else now.
            received = request.channel.arrived or time.time()
            request.channel.arrived = None
            task_id = orjson.loads(request.content.read())["task_id"]
            body = orjson.dumps(
                {
                    "task_id": task_id,
                    "status": "completed",
                    "result": {},
                    "execution_time_ms": 0,
                }
            )
            request.responseHeaders.setRawHeaders(b"content-type", _JSON)
            request.responseHeaders.setRawHeaders(
                b"content-length", [str(len(body)).encode("ascii")]
            )
            answered = time.time()
            if task_id in self.tasks:
                self.duplicates += 1
            if self.pace is not None:
                self.pace.seen()
            self.tasks[task_id] = (received, answered)
            if self.first_received is None:
                self.first_received = received
            self.last_answered = answered
            if self.delay:  # a slower agent: each task takes this long
                reactor.callLater(self.delay, _finish, request, body)
                return NOT_DONE_YET  # type: ignore[no-any-return]
            return body
        if request.path == b"/bench/reset":
            self.reset()
            return _reply(request, {"reset": True})
        if request.path == b"/bench/pace":
            return self._start_pace(request)
        return _reply(request, {"error": "not found"}, 404)

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/health":
            if self.agent_id is None and self.orchestrator is not None:
                return _reply(
                    request,
                    {"status": "registering", "problem": self.problem},
                    503,
                )
            return _reply(request, {"status": "healthy", "agent_id": self.agent_id})
        if request.path == b"/bench/stats":
            return _reply(
                request,
                {
                    "answered": len(self.tasks) + self.duplicates,
                    "unique": len(self.tasks),
                    "duplicates": self.duplicates,
                    "first_received": self.first_received,
                    "last_answered": self.last_answered,
                },
            )
        if request.path == b"/bench/pace":
            run = self.pace
            if run is None:
                return _reply(request, {"error": "no paced run"}, 404)
            if not run.done or (
                # The service answers 201 once its insert is on disk, which can
                # be before its call has reached this agent: wait for the calls
                # of every accepted task, for a while.
                time.time() - run.done_at < _CALLS_GRACE
                and any(row[3] == 201 and row[4] not in self.tasks for row in run.rows)
            ):
                return _reply(
                    request,
                    {
                        "running": True,
                        "sent": run.next,
                        "count": run.count,
                        "codes": {str(c): n for c, n in sorted(run.codes.items())},
                    },
                    202,
                )
            report = run.report()
            for row in report["rows"]:
                row.extend(self.tasks.get(row[4], (None, None)))
            self.pace = None
            return _reply(request, report)
        return _reply(request, {"error": "not found"}, 404)

    def _start_pace(self, request: Any) -> bytes:
        options = orjson.loads(request.content.read())
        # Where the tasks go: the orchestrator unless told otherwise.
        port = options.get("port", self.orchestrator)
        if port is None:
            return _reply(
                request, {"error": "no port given, started without --orchestrator"}, 400
            )
        if self.pace is not None and not self.pace.done:
            return _reply(request, {"error": "a paced run is going on"}, 409)
        seconds = float(options["seconds"])
        window = options.get("window")
        rate = float(options.get("rate") or 1.0)
        count = 1 if window else max(1, round(rate * seconds))
        self.pace = PacedRun(
            int(port),
            rate,
            count,
            options["body"].encode(),
            int(options.get("connections", 8)),
            keep_rows=bool(options.get("rows", True)) and not window,
            window=None if window is None else int(window),
            seconds=seconds,
        )
        return _reply(request, {"started": True, "count": count}, 202)

    # Registration and heartbeats, as a real agent does them.
    async def register(self, port: int) -> None:
        assert self.orchestrator is not None
        base = f"http://{INTERFACE}:{self.orchestrator}"
        body = {
            "name": "bench-fast-agent",
            "type": "cost",
            "host": INTERFACE,
            "port": port,
            "capabilities": ["analyze_cost"],
            "version": "1.0.0",
            "metadata": {"purpose": "bench/tasks.py"},
        }
        for _ in range(50):
            try:
                response = await treq.post(f"{base}/agents/register", json=body)
                content = await treq.content(response)
            except Exception as error:  # the orchestrator is not up yet
                self.problem = repr(error)
            else:
                if response.code in (200, 201):
                    self.agent_id = orjson.loads(content)["agent_id"]
                    print(f"registered as {self.agent_id}", file=sys.stderr, flush=True)
                    return
                self.problem = f"{response.code} {content[:200]!r}"
            await _sleep(0.2)
        print(f"could not register: {self.problem}", file=sys.stderr, flush=True)
        reactor.stop()

    async def heartbeat(self) -> None:
        if self.agent_id is None or self.orchestrator is None:
            return
        url = f"http://{INTERFACE}:{self.orchestrator}/agents/{self.agent_id}/heartbeat"
        try:
            response = await treq.post(url, json={"status": "healthy"})
            await treq.content(response)
        except Exception as error:  # say it; the next beat tries again
            print(f"heartbeat failed: {error!r}", file=sys.stderr, flush=True)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    return {f"p{p}": round(percentile(seconds, p / 100) * 1e3, 2) for p in (50, 99)}


def _finish(request: Any, body: bytes) -> None:
    if not request.finished and not request._disconnected:
        request.write(body)
        request.finish()


def _sleep(seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--orchestrator",
        type=int,
        help="the orchestrator's port on 127.0.0.1: register there and heartbeat",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=10.0, help="seconds between heartbeats"
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="seconds each task takes (default: answered at once)",
    )
    args = parser.parse_args()
    agent = FastAgent(args.orchestrator, args.delay)
    root = Site(agent, parsePOSTFormSubmission=False)
    root.protocol = _Channel
    if args.orchestrator is not None:
        from twisted.internet.defer import ensureDeferred

        def start() -> None:
            registering = ensureDeferred(agent.register(args.port))

            def beat() -> Any:
                return ensureDeferred(agent.heartbeat())

            registering.addCallback(
                lambda _: LoopingCall(beat).start(args.heartbeat, now=False)
            )

        reactor.callWhenRunning(start)
    serve(
        root,
        argparse.Namespace(port=args.port, interface=INTERFACE, tune_gc=False),
    )


if __name__ == "__main__":
    main()
