"""``durable-heap serve``: a program as an HTTP service, on uvicorn.

What it promises (docs/serve.md tells users the same):

* ``POST /<function>`` calls a public module-level function of the program as
  one action: a JSON array body is its positional arguments, an object its
  keyword arguments (tagged JSON, `durable_heap._jsonform`); the answer is
  ``{"result": ...}``. A program that defines ``endpoint(request)`` gets every
  request instead (a `durable_heap.Request`), in one transaction.
* Paths that start with ``/_`` belong to the runtime: ``GET /_health``,
  ``GET /_workflows/<id>``, ``GET /_inspect`` (with ``--inspect``, loopback only).
* **The answer is sent only after the commit succeeded.** The call, the
  rendering of its result (which may read durable objects) and the commit run
  in one transaction in a worker thread; a conflict re-runs all of it before
  anything was sent; a failed call commits nothing.
* Errors answer ``{"error": {"type": ..., "message": ...}}`` with a status
  that says what a client may do (`error_answer`): 503 means nothing was
  committed (safe to retry), a 500 with ``"outcome": "unknown"`` means the
  commit may have happened (check before repeating).
* A change of the program file deploys it (`Program.deploy_if_changed`, from a
  watcher thread, which waits for the calls in flight: each request runs on one
  version); a broken file keeps the old version serving, logged and shown by
  ``/_health``. SIGTERM stops accepting, lets the requests in flight finish
  (committed and answered), stops the watcher and closes the heap.
* ``--workers N`` on a heap file starts ``durable-heap zeo`` for it on a private
  unix socket and N uvicorn worker processes that are its clients.

Why uvicorn: it is the most used ASGI server, kept by the encode team
(Starlette, httpx), small (h11 and click), and does what a hand-made HTTP layer
would get wrong: HTTP/1.1 keep-alive and pipelining, graceful shutdown on
SIGTERM, a multi-process supervisor sharing one socket, TLS. Its only import
happens in `run`, so ``import durable_heap`` stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ._callpool import CallPool
from ._errors import ConflictError, DurableHeapError, FunctionNotFoundError, JSONFormError, StorageError
from ._http import (
    Answer,
    Request,
    _Answer,
    _error,
    _json_answer,
    _status_headers,
    error_answer,
    render,
    send_answer,
)
from ._jsonform import decode, dumps, resolve_loaded
from ._parent import ZEO_CHILD
from ._retry import RetryQueue, call_note, conflict, pause
from ._versions import public_functions
from ._waits import waiting
from ._workflows import Workflow, signature_of

__all__ = ["ServeConfig", "Service", "public_functions", "run"]

log = logging.getLogger("durable_heap.serve")

#: The largest request body read (bigger ones answer 413).
MAX_BODY = 16 * 1024 * 1024
#: How often the in-process scheduler looks for work that it was not woken for (seconds).
#: It wakes by itself at the next timer's deadline and at a commit of this process that
#: adds work; only work added by another process (another worker) waits for this poll.
#: `run_scheduler`'s own default, 5 ms, is two transactions per poll: per worker, 400
#: a second, which took a fifth of each worker's time under load, over ZEO a round trip
#: to the server each (measured: 4 idle workers kept 0.4 of a core busy).
SCHEDULER_POLL = 0.5
#: The environment variable that hands a worker process its configuration.
_CONFIG_ENV = "DURABLE_HEAP_SERVE_CONFIG"
#: ... and the parent's process id, which it dies with (`die_with_parent`).
_PARENT_ENV = "DURABLE_HEAP_SERVE_PARENT"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass
class ServeConfig:
    """How `durable-heap serve` runs; also what the parent hands each worker (as JSON)."""

    program: str
    target: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 16
    attempts: int | None = None
    debug: bool = False
    inspect: bool = False
    watch: bool = True
    watch_interval: float = 0.5
    allow: list[str] = dataclasses.field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None


#: Calls of a process on the CPU at once on a heap file (`CallPool`); 0: as many as
#: --threads, a plain thread pool (``DURABLE_HEAP_SERVE_CPU_SLOTS=0``: only for
#: ``python -m benchmarks.serve --compare-slots``).
_CPU_SLOTS = int(os.environ.get("DURABLE_HEAP_SERVE_CPU_SLOTS", "1"))


class Service:
    """One process's share of `durable-heap serve`: its heap, its program, the ASGI app.

    Built before uvicorn starts (so that a heap that will not open or a
    program that will not load is one clear error), closed by the ASGI
    lifespan's shutdown (after uvicorn drained the requests in flight).
    """

    def __init__(self, config: ServeConfig) -> None:
        import durable_heap

        from ._versions import load

        self.config = config
        self.started = time.time()
        #: The last deploy that failed (the file is broken): its message, else None.
        self.deploy_error: str | None = None
        self.deploy_error_at: float | None = None
        options: dict[str, Any] = {"attempts": config.attempts} if config.attempts else {}
        self.heap = durable_heap.open(config.target, allow=config.allow, **options)
        try:
            self.program = load(self.heap, config.program, deploy=True, on_deploy=self._deployed)
            self.program.module  # noqa: B018 - loads the current version now, not at the first call
        except BaseException:
            self.heap.close()
            raise
        # One call on the CPU at a time where commits announce their fsync waits (a heap
        # file: `durable_heap._groupcommit`); elsewhere (a ZEO client, PostgreSQL) a plain
        # pool, which measured faster there: a commit is several round trips.
        slots = _CPU_SLOTS if self.heap.target.scheme == "file" else 0
        self._pool = CallPool(config.threads, slots or config.threads)
        self._stop = threading.Event()
        #: The retries of calls that conflicted, one at a time in this process (`_call`).
        self._retrying = RetryQueue()
        #: Tries of calls that ended in a conflict, since the start (``/_health``).
        self.conflicts = 0
        self._watcher: threading.Thread | None = None
        self._closed = False
        self.workflows = _Workflows(self)
        #: (the loaded module, its functions' signatures by name): see `_signature`.
        self._signatures: tuple[types.ModuleType | None,
                                dict[str, tuple[inspect.Signature, int]]] = (None, {})

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher thread (hot deploy) and the scheduler (see `_Workflows`)."""
        if self.config.watch and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="durable-heap-watch", daemon=True)
            self._watcher.start()
        self.workflows.start()

    def close(self) -> None:
        """Stop the watcher and the scheduler, wait for calls still running, close the heap."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.workflows.stop()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        self._pool.shutdown(wait=True)
        self.heap.close()
        log.info("closed the heap %s", self.heap.target)

    def _deployed(self, version: Any) -> None:
        self.deploy_error = self.deploy_error_at = None
        log.info("deployed %s version %s (source %s)", version.program, version.number,
                    version.source_hash[:12])

    def _in_force(self) -> int | str:
        """The number of the version that serves the next calls: the heap's current one.

        Not the one loaded in this process, which may be older (a deploy is loaded at
        the next call): the log said "version 2 stays in force; version 1 keeps serving".
        """
        try:
            return int(self.program.version.number)
        except Exception:  # noqa: BLE001 - only for a log line
            return self.program._loaded[0] or "?"

    def _watch(self) -> None:
        """Deploy the program file when it changes; a broken one is reported, the old version serves."""
        program = self.program
        while not self._stop.wait(self.config.watch_interval):
            before = program._stamp
            try:
                program.deploy_if_changed()
            except DurableHeapError as exc:
                self.deploy_error, self.deploy_error_at = str(exc), time.time()
                log.error("%s; version %s keeps serving", exc, self._in_force())
                continue
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad check
                log.exception("the deploy check failed")
                continue
            if program._stamp != before and self.deploy_error is not None:
                # Changed back to the source in force: nothing to deploy, nothing broken.
                self.deploy_error = self.deploy_error_at = None

    # -- the ASGI app --------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        try:
            body = await _read_body(receive)
        except _Answer as exc:
            await send_answer(send, exc.answer)
            return
        request = Request(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"),
                          _headers(scope), body)
        if request.headers.get("upgrade", "").lower() == "websocket":
            await send_answer(send, _NO_WEBSOCKETS)
            return
        client = scope.get("client")
        loop = asyncio.get_running_loop()
        try:
            # The whole call, its rendering and its commit run in a worker thread
            # (one ZODB connection per thread); the answer is sent from here after.
            answer = await loop.run_in_executor(self._pool, self._handle, request, client)
        except RuntimeError:  # the pool was shut down: the service is stopping
            answer = _error(503, "ServiceStopping", "the service is stopping: nothing was run; "
                            "retry against a running instance", outcome="not committed")
        await send_answer(send, answer)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.start()
                except Exception as exc:  # noqa: BLE001 - reported to uvicorn, which stops
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn has drained the requests in flight by now.
                await asyncio.get_running_loop().run_in_executor(None, self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _handle(self, request: Request, client: Any) -> Answer:
        """Route one request (in a worker thread); every exception becomes an answer."""
        try:
            path = request.path
            if path.startswith("/_"):
                return self._runtime(request, client)
            module = self.program._module
            if module is not None and callable(module.__dict__.get("endpoint")):
                return self._endpoint(request)
            return self._function(request)
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a dropped connection
            answer = error_answer(exc, debug=self.config.debug)
            if answer[0] >= 500 and not isinstance(exc, DurableHeapError):
                if self.config.debug:
                    log.error("%s %s failed", request.method, request.path, exc_info=exc)
                else:
                    log.error("%s %s failed: %s: %s", request.method, request.path, type(exc).__name__, exc)
            return answer

    # -- conflicts ----------------------------------------------------------------------------

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              then: Callable[[Any], Any]) -> Any:
        """``program._call`` with serve's conflict policy: a call that conflicted queues for its retries.

        Each call is tried up to the heap's attempts (``--attempts``, default
        10), backing off a growing random time between tries (`pause`), as
        everywhere. What serve adds: a call's retries run one at a time in this
        process (`_retrying.lock`). Under a storm on one hot record (50 requests on one
        entry across 4 worker processes) every try of every call otherwise meets
        the others' commits, and calls ran out of tries; queued, at most one
        retried call per process contends, one of them commits each round, and
        a try is spent only on a real chance (waiting in the queue is not a try).
        While a call of this process is between its first conflict and its end
        (`_retrying.hot`), first tries queue too: ZEO's client no longer runs one commit at
        a time per process (`durable_heap._zeo._finish_co`), and a queued retry
        then met up to 16 fresh first tries of each worker per round and ran out
        of tries (the 4-worker storm of tests/test_serve.py). Otherwise a first
        try takes no lock: while nothing conflicts, no call waits.
        """
        attempts = self.heap.max_attempts
        program = self.program
        hot = False
        try:
            for n in range(1, attempts + 1):
                try:
                    if n == 1 and not self._retrying.hot:
                        return program._call(name, args, kwargs, then, attempts=1)
                    with self._retrying.lock:
                        return program._call(name, args, kwargs, then, attempts=1)
                except ConflictError as exc:
                    self.conflicts += 1
                    if not hot:
                        hot = True
                        self._retrying.enter()
                    if n == attempts:
                        note = call_note(name, args, kwargs)
                        raise conflict(n, note, exc.__cause__, how="durable-heap serve --attempts N") from exc
                with waiting():  # (its CPU slot free meanwhile: `CallPool`)
                    pause(n)
        finally:
            if hot:
                self._retrying.leave()
        raise AssertionError("unreachable")

    # -- POST /<function> ------------------------------------------------------------------

    def _function(self, request: Request) -> Answer:
        name = request.path[1:]
        if not name or "/" in name:
            return _error(404, "NotFound", f"there is no function at {request.path}: call a function "
                          f"of {self.program.name} with POST /<function>")
        if request.method != "POST":
            wrong = _error(405, "MethodNotAllowed", f"call {name} with POST /{name} and a JSON body: "
                           "an array (positional arguments) or an object (keyword arguments)")
            return _status_headers(wrong, [("allow", "POST")])
        args, kwargs = self._arguments(request)
        self._check_binds(name, args, kwargs, load_current=True)
        program = self.program
        served: list[int] = []

        workflows = self.workflows

        def then(result: Any) -> Any:
            served.append(program._loaded[0])  # inside the call: the version that ran it
            if workflows.is_workflow(result):
                return result  # its status is read after the commit (it runs right after it)
            return _result_body(result)

        try:
            body = self._call(name, tuple(args), kwargs, then)
        except TypeError as exc:
            if isinstance(exc, DurableHeapError):
                raise
            self._check_binds(name, args, kwargs)  # a new version may have a new signature
            raise
        if not isinstance(body, bytes):
            status, headers, body = workflows.started(body)
            return status, [*headers, *_version_header(served)], body
        return 200, [("content-type", "application/json"), *_version_header(served)], body

    def _arguments(self, request: Request) -> tuple[list[Any], dict[str, Any]]:
        if not request.body.strip():
            return [], {}
        try:
            value = json.loads(request.body)
            if not (type(value) is list and all(type(v) in _PLAIN for v in value)):
                value = decode(value, resolve=self._resolve)  # tags, nested values: the full reader
        except (ValueError, JSONFormError) as exc:
            message = str(exc) if isinstance(exc, JSONFormError) else f"the body is not JSON: {exc}"
            raise _Answer(_error(400, "BadRequest", message)) from None
        if isinstance(value, list):
            return value, {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return [], value
        raise _Answer(_error(400, "BadRequest", "the body must be a JSON array (the positional "
                             "arguments) or a JSON object (the keyword arguments), not "
                             f"{type(value).__name__}"))

    def _resolve(self, name: str) -> Any:
        """Classes an argument may name: the program's own (and durable_heap's), already loaded."""
        root = name.partition(".")[0]
        if root not in (self.program.name, "durable_heap"):
            return None
        return resolve_loaded(name)

    def _check_binds(self, name: str, args: list[Any], kwargs: dict[str, Any], *,
                     load_current: bool = False) -> None:
        """A 404 (no such public function) or 400 (the arguments do not bind) before the call.

        The module loaded in this process may be older than the heap's current
        version: a deploy (by the watcher, or by another process) is loaded at the
        next call, and it may add the function or change its signature. So with
        `load_current` (before the call) a miss loads the current version
        (``program.module``; waiting for the calls in flight) and checks against it.
        """
        module = self.program._module
        if module is None:
            return  # not loaded yet: the call finds out
        try:
            self._bind(module, name, args, kwargs)
        except (FunctionNotFoundError, _Answer):
            if not load_current:
                raise
            current = self.program.module
            if current is module:
                raise
            self._bind(current, name, args, kwargs)

    def _bind(self, module: types.ModuleType, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        signature, arity = self._signature(module, name)
        if len(args) == arity and not kwargs:
            return  # as many positional arguments as it has parameters, none with a default
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise _Answer(_error(400, "BadArguments", f"the arguments do not fit "
                                 f"{name}{signature}: "
                                 f"{exc}; nothing was run")) from None

    def _signature(self, module: types.ModuleType, name: str) -> tuple[inspect.Signature, int]:
        """The signature of the program's public function `name`, cached per loaded module,
        with its arity: the number of its parameters if each is a plain positional one
        without a default (exactly that many positional arguments bind), else -1.

        `public_functions` and `inspect.signature` took about a tenth of serve's
        own CPU per request; a deploy (or a rollback, or another process's deploy)
        loads a new module object, which starts a new cache. A function a call
        binds at module level later (``globals()[name] = f``) is seen at the next
        cache miss of that name, as `public_functions` sees it.
        """
        cache = self._signatures
        if cache[0] is not module:
            cache = self._signatures = (module, {})
        signature = cache[1].get(name)
        if signature is None:
            func = public_functions(module).get(name)
            if func is None:
                listed = ", ".join(sorted(public_functions(module))) or "none"
                raise FunctionNotFoundError(
                    f"{self.program.name} has no function {name!r} (its functions: {listed})")
            known = signature_of(func)
            signature = cache[1][name] = known if known is not None else (inspect.Signature(), -1)
        return signature

    # -- endpoint(request) -------------------------------------------------------------------

    def _endpoint(self, request: Request) -> Answer:
        served: list[int] = []
        program = self.program

        def then(result: Any) -> Answer:
            served.append(program._loaded[0])
            answer = render(result)
            if answer[0] >= 500:
                raise _Answer(answer)  # an answer of failure: its changes are rolled back
            return answer

        status, headers, body = self._call("endpoint", (request,), {}, then)
        return status, [*headers, *_version_header(served)], body

    # -- /_ paths: the runtime's ---------------------------------------------------------------

    def _runtime(self, request: Request, client: Any) -> Answer:
        path = request.path.rstrip("/") or "/"
        if path == "/_health" and request.method in ("GET", "HEAD"):
            return _json_answer(200, self.health())
        if path.startswith("/_workflows/") and request.method == "GET":
            return self.workflows.get(path[len("/_workflows/"):])
        if path == "/_inspect" or path.startswith("/_inspect/"):
            if self.config.inspect and _is_loopback_client(client):
                from ._inspect import answer

                return answer(self, request)
            if self.config.inspect:
                return _error(403, "Forbidden", "the state inspector answers loopback clients only")
        return _error(404, "NotFound", f"{request.path} is not a runtime path (those are /_health, "
                      "/_workflows/<id> and, with --inspect, /_inspect)")

    def health(self) -> dict[str, Any]:
        """What ``GET /_health`` answers: the version, the last deploy, the scheduler."""
        program = self.program
        try:
            current = program.version
            version: Any = {"number": current.number, "source_hash": current.source_hash,
                            "deployed_at": current.deployed_at.isoformat(), "note": current.note}
            ok = True
        except DurableHeapError as exc:
            version, ok = {"error": str(exc)}, False
        deploy: dict[str, Any] = {"ok": self.deploy_error is None}
        if self.deploy_error is not None:
            deploy["error"] = self.deploy_error
            deploy["failed_at"] = _iso(self.deploy_error_at)
        return {
            "status": "ok" if ok and self.deploy_error is None else "degraded",
            "program": program.name,
            "file": program.path,
            "version": version,
            "serving": program._loaded[0] or None,
            "deploy": deploy,
            "scheduler": self.workflows.state(),
            "conflicts": self.conflicts,
            "heap": str(self.heap.target),
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
        }


# --- workflows and the scheduler: the integration point with durable execution ----------


class _Workflows:
    """Everything serve does with durable execution (`heap.workflow`, `heap.run_scheduler`):

    * a call whose result is a started workflow answers 202
      ``{"workflow_id": ..., "status": ...}`` (`started`);
    * ``GET /_workflows/<id>`` answers the workflow's status, what it waits on,
      its result or error (`get`);
    * the scheduler runs in a thread of the serving process (`start`, `stop`).
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        self.heap = service.heap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self) -> None:
        """Start the in-process scheduler (timers, wakes, events) in a thread of its own."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="durable-heap-scheduler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.heap.run_scheduler(stop=self._stop, poll=SCHEDULER_POLL)
        except Exception as exc:  # noqa: BLE001 - reported in /_health, not a dead thread's traceback
            if not self._stop.is_set():
                self._error = f"{type(exc).__name__}: {exc}"
                log.error("the scheduler stopped: %s", self._error)

    def stop(self) -> None:
        """Stop the scheduler, letting the item it runs finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def state(self) -> dict[str, Any]:
        if self._error is not None:
            return {"state": "failed", "error": self._error}
        running = self._thread is not None and self._thread.is_alive()
        return {"state": "running" if running else "stopped"}

    def listing(self, limit: int = 50) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """The newest `limit` workflows and the first `limit` timers, for the inspector."""
        flows = []
        for handle in self.heap.workflows()[-limit:][::-1]:
            info = handle.info
            flows.append({k: info.get(k) for k in ("id", "function", "status", "since", "waiting_on")})
        pending = [{"id": t.id, "kind": t.kind, "target": t.target, "due": t.due, "dead": t.dead}
                   for t in self.heap.timers()[:limit]]
        return flows, pending

    @staticmethod
    def is_workflow(value: Any) -> bool:
        """A handle on a workflow a call started (durable execution's ``Workflow``)."""
        return isinstance(value, Workflow)

    def started(self, handle: Any) -> Answer:
        """The 202 answer for a call that started a workflow (read after the call's commit)."""
        return _json_answer(202, {"workflow_id": handle.id, "status": handle.status},
                            [("location", f"/_workflows/{handle.id}")])

    def get(self, workflow_id: str) -> Answer:
        try:
            info = self.heap.workflow_by_id(workflow_id).info
        except LookupError as exc:
            return _error(404, type(exc).__name__, str(exc))
        except DurableHeapError as exc:
            if "no workflow" in str(exc):
                return _error(404, type(exc).__name__, str(exc))
            raise
        return 200, [("content-type", "application/json")], dumps(info).encode("utf-8")


# --- helpers ------------------------------------------------------------------------------

#: The types that are their own tagged JSON (exact types: an IntEnum member is tagged,
#: a float may be a nan or an infinity, which are tagged too: neither is here).
_PLAIN = frozenset({str, int, bool, type(None)})


def _result_body(result: Any) -> bytes:
    """``{"result": ...}`` as tagged JSON (`durable_heap._jsonform`), as bytes.

    A plain string, integer, boolean or None is its own tagged form, so it skips
    the tagged encoder's walk (about a tenth of serve's own CPU per request);
    the text is the same.
    """
    if type(result) in _PLAIN:
        return json.dumps({"result": result}, ensure_ascii=False).encode("utf-8")
    return dumps({"result": result}).encode("utf-8")


#: The answer to a WebSocket handshake. uvicorn runs with ``ws="none"``, so a handshake
#: arrives as a plain request, answered here, whatever WebSocket library is installed.
_NO_WEBSOCKETS = _error(
    501, "WebSocketsNotSupported",
    "durable-heap serve answers HTTP requests only, not WebSockets: each request is one "
    "transaction, and a WebSocket connection outlives any transaction. Serve WebSockets "
    "from your own ASGI app (Starlette, FastAPI) beside it, with one `async with "
    "heap.transaction()` per message (see durable_heap.asgi.TransactionMiddleware's exclude)")


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Answer(_error(400, "BadRequest", "the client went away before its request was read"))
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _Answer(_error(413, "PayloadTooLarge", f"the request body is over {MAX_BODY} bytes"))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        name, value = k.decode("latin-1").lower(), v.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _version_header(served: list[int]) -> list[tuple[str, str]]:
    return [("x-durable-heap-version", str(served[-1]))] if served else []


def _iso(t: float | None) -> str | None:
    import datetime

    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def _is_loopback_client(client: Any) -> bool:
    from ._zeo_server import is_loopback

    if not client:
        return True  # a unix socket: local by construction
    return is_loopback(str(client[0]))


# --- running it -------------------------------------------------------------------------------


def worker_app() -> Service:
    """The app factory of a worker process (``--workers``): its configuration comes in the environment."""
    parent = os.environ.get(_PARENT_ENV)
    if parent:
        from ._parent import die_with_parent

        die_with_parent(int(parent))
    config = ServeConfig(**json.loads(os.environ[_CONFIG_ENV]))
    return Service(config)


def check_host(config: ServeConfig, insecure: bool) -> None:
    """Refuse a public address without TLS, as ``durable-heap zeo`` does."""
    from ._zeo_server import is_loopback

    if config.tls_cert is None and not is_loopback(config.host) and not insecure:
        raise StorageError(
            f"refusing to serve on {config.host} without TLS: anyone who can reach it could call "
            "the program's functions. Give --tls-cert and --tls-key, put a TLS-terminating "
            "reverse proxy in front and pass --insecure, or serve on 127.0.0.1"
        )


def run(config: ServeConfig) -> int:
    """Serve until SIGTERM or Ctrl-C; return the exit status."""
    import uvicorn

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.workers > 1:
        return _run_workers(config)
    service = Service(config)
    try:
        uconfig = uvicorn.Config(service, host=config.host, port=config.port, lifespan="on", ws="none",
                                 access_log=False, log_level="warning", timeout_graceful_shutdown=None,
                                 ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
        server = uvicorn.Server(uconfig)
        sock = _listen(config, uconfig.backlog)
        _announce(config, sock, service)
        _quiet_sigterm()
        server.run(sockets=[sock])
    finally:
        service.close()
    return 0


def _listen(config: ServeConfig, backlog: int) -> Any:
    """The listening socket, made here rather than by uvicorn's ``Config.bind_socket``.

    asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
    ``proto`` is IPPROTO_TCP (``asyncio.base_events._set_nodelay``); a socket made
    with ``proto=0``, as ``bind_socket`` makes it, keeps Nagle on, and every answer
    (headers and body are two writes) then waits for the client's delayed ACK:
    about 40 ms a request (measured here: 48 ms against 6 ms for ``GET /_health``).
    It listens at once, so clients queue until uvicorn (or its workers) accept.
    """
    import socket

    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StorageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}. "
                           "Choose another --port (0 picks a free one) or --host") from None
    sock.set_inheritable(True)  # the worker processes serve it too
    return sock


def _quiet_sigterm() -> None:
    """After its graceful shutdown uvicorn raises the signal it caught again, under the
    handler that was there before it: a no-op one lets SIGTERM end in exit status 0,
    as a service manager expects of a clean stop (``durable-heap zeo`` does the same)."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda sig, frame: None)


def _announce(config: ServeConfig, sock: Any, service: Service | None) -> None:
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.tls_cert else "http"
    shown = f"[{host}]" if ":" in host else host
    what = f"{service.program.name} version {service.program._loaded[0]}" if service else config.program
    workers = f", {config.workers} workers" if config.workers > 1 else ""
    log.info("serving %s at %s://%s:%s (heap %s%s)", what, scheme, shown, port, config.target, workers)
    print(f"{scheme}://{shown}:{port}", flush=True)


def _run_workers(config: ServeConfig) -> int:
    """A ZEO server for the heap file, then N uvicorn workers as its clients.

    SIGTERM reaches this process: uvicorn's supervisor sends it on to the workers
    and waits for them (each drains its requests), and only then is the ZEO server
    stopped, so no worker loses its server while it commits.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    with _zeo_for(config) as zeo:
        worker_config = dataclasses.replace(config, target=zeo.url)
        # Deploy once here, so a broken program is one error now, not N workers failing.
        Service(dataclasses.replace(worker_config, watch=False)).close()
        os.environ[_CONFIG_ENV] = json.dumps(dataclasses.asdict(worker_config))
        os.environ[_PARENT_ENV] = str(os.getpid())  # the workers die with this process
        uconfig = uvicorn.Config("durable_heap._serve:worker_app", factory=True, host=config.host,
                                 port=config.port, workers=config.workers, lifespan="on", ws="none",
                                 access_log=False,
                                 log_level="warning", timeout_graceful_shutdown=None,
                                 ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
        sock = _listen(config, uconfig.backlog)
        _announce(config, sock, None)
        _quiet_sigterm()
        Multiprocess(uconfig, sockets=[sock]).run()
    if zeo.lost is not None:
        print(f"durable-heap serve stopped: its ZEO server stopped (exit status {zeo.lost}), "
              "see its last lines above; every commit it acknowledged is in the heap file. "
              "Start serve again (a service manager's restart does it).", file=sys.stderr, flush=True)
        return 1
    return 0


@dataclasses.dataclass
class _ZeoChild:
    """The ZEO server `serve --workers` runs: its URL, and its exit status if it stopped
    while serving (after a failed fsync it exits 1 rather than serve a closed heap)."""

    url: str
    lost: int | None = None


@contextlib.contextmanager
def _zeo_for(config: ServeConfig) -> Iterator[_ZeoChild]:
    """``durable-heap zeo`` for the heap file, on a unix socket in a private folder.

    If the server stops while the workers serve, every later commit would fail: this
    process then stops its workers (SIGTERM to itself, so uvicorn drains them) and exits 1,
    so that a service manager restarts the whole service on a fresh server."""
    import signal
    import subprocess
    import tempfile

    from ._targets import parse_target

    target = parse_target(config.target)
    if target.scheme != "file":
        raise StorageError(
            f"--workers needs a heap file (it starts a ZEO server for it); {config.target} is "
            "not one. Several processes on a zeo:// heap: start each with --storage zeo://..."
        )
    folder = tempfile.mkdtemp(prefix="durable-heap-serve-")  # 0700: the socket is private
    # It dies with this process, even a SIGKILLed one (`_parent.ZEO_CHILD`).
    cmd = [sys.executable, "-c", ZEO_CHILD, str(os.getpid()), folder,
           "--storage", target.location, "--address", os.path.join(folder, "zeo.sock")]
    for pattern in config.allow:
        cmd += ["--allow", pattern]
    zeo = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)  # its log: our stderr
    try:
        assert zeo.stdout is not None
        line = zeo.stdout.readline().strip()
        if not line.startswith("zeo://"):
            zeo.wait(timeout=30)
            raise StorageError(f"the ZEO server for {target.location} did not start (exit "
                               f"{zeo.returncode}); its error is above")
        child = _ZeoChild(line)
        stopping = threading.Event()

        def watch() -> None:
            code = zeo.wait()
            if not stopping.is_set():
                child.lost = code
                log.error("the ZEO server for %s stopped (exit status %s): stopping the workers",
                          target.location, code)
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="durable-heap-serve-zeo-watch", daemon=True).start()
        try:
            yield child
        finally:
            stopping.set()
    finally:
        if zeo.poll() is None:
            zeo.send_signal(signal.SIGTERM)
            try:
                zeo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                zeo.kill()
        if zeo.stdout is not None:
            zeo.stdout.close()
        with contextlib.suppress(OSError):
            os.rmdir(folder)
