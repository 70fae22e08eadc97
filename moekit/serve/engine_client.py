"""The engine thread and the handlers' side of it (vLLM calls this the engine client).

One thread owns the :class:`~moekit.infer.Engine` (which is not thread-safe) and steps it while there
is work. Handlers talk to it with typed commands (:class:`Add`, :class:`Cancel`, :class:`Shutdown`) and
receive events on an asyncio queue: one :class:`Group` per HTTP request, holding its choices.

Plan of the loop: take every pending command (add a request -> resolve the submitter's future with
the request id or the engine's error; cancel; shut down), then, if the engine has work, run one
``engine.step()`` and hand the step's events to their groups, one hop onto the event loop per group
and step. New requests thus join the running batch between two decode steps (continuous batching).
A group that does not stream gets its events once each request has finished (no hop per token).

Faults are never reported as a normal finish: a request ended by a failing step, a shutdown or a
dead engine thread receives a :class:`Failure` (HTTP status and message) instead of a finish event.
The thread is supervised: a failure while delivering to one request or in the step callback is
logged and contained to that request; if the loop itself dies, every request fails, later submits
are refused and :attr:`EngineClient.healthy` turns False (``/health`` answers 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moekit.infer import Engine, SamplingParams
from moekit.infer.engine import Event

log = logging.getLogger("moekit.serve")


@dataclass(frozen=True)
class Failure:
    """A request ended by a fault (not by its own stop rule); becomes an OpenAI-shaped error."""

    request_id: str
    status: int  # 500: the engine failed; 503: the server is shutting down or its engine thread died
    message: str
    type: str = "server_error"


class Unavailable(Exception):
    """The engine thread is stopped or dead: no request can be taken (HTTP 503)."""


@dataclass(eq=False)
class Group:
    """The requests of one HTTP request (its choices) as the handler sees them."""

    loop: asyncio.AbstractEventLoop
    stream: bool  # False: a request's events arrive together when it has finished
    items: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of Event | Failure, in order
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Submitted:
    request_id: str
    prompt_tokens: int


# ------------------------------------------------------------------ commands (handler -> engine thread)
@dataclass(frozen=True)
class Add:
    prompt: list[int]
    params: SamplingParams
    group: Group
    future: concurrent.futures.Future


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    message: str = "the server is shutting down"


Command = Add | Cancel | Shutdown


class EngineClient:
    """Runs ``engine`` on a daemon thread; :meth:`submit` and :meth:`cancel` are safe from any thread."""

    def __init__(self, engine: Engine, on_step: Callable[[list[Event], float], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called on the engine thread after each step with (events, seconds)
        self.error: BaseException | None = None  # why the loop died
        self._commands: queue.Queue[Command] = queue.Queue()
        self._groups: dict[str, Group] = {}  # request id -> its group
        self._held: dict[str, list[Event]] = {}  # events of non-streaming requests, until they finish
        self._stopping: str | None = None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moekit-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None and self._stopping is None

    # ------------------------------------------------------------------ callers (event loop)
    def group(self, stream: bool) -> Group:
        return Group(asyncio.get_running_loop(), stream)

    async def submit(self, group: Group, prompt: list[int], params: SamplingParams) -> Submitted:
        """Queue a request in ``group``; raises the engine's error (EngineError, EngineFull) for a bad
        one and :class:`Unavailable` when the engine thread is not running."""
        if not self.healthy:
            raise Unavailable(self.why_unavailable())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._put(Add(prompt, params, group, fut))
        return await asyncio.wrap_future(fut)

    def cancel(self, request_id: str) -> None:
        self._put(Cancel(request_id))

    def stop_soon(self) -> None:
        """Fail what is still running (503: shutting down) and stop the thread; returns at once."""
        self._put(Shutdown())

    def shutdown(self, timeout: float = 10.0) -> None:
        """:meth:`stop_soon`, then wait for the thread."""
        self.stop_soon()
        self._thread.join(timeout)

    def _put(self, cmd: Command) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def why_unavailable(self) -> str:
        if self.error is not None:
            return "the engine stopped after an internal error; restart the server"
        return self._stopping or "the engine is not running"

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while self._stopping is None:
                self._drain_commands()
                if self._stopping is not None:
                    break
                if not self.engine.has_work():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
            self._fail_everything(503, self._stopping or "the server is shutting down")
        except BaseException as e:  # noqa: BLE001 - the loop itself died: nothing may hang on it
            self.error = e
            log.exception("the engine thread died; every request fails and /health reports unhealthy")
            self._fail_everything(503, "the engine stopped after an internal error; restart the server")

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            events: list[Event | Failure] = list(self.engine.step())
        except Exception:  # noqa: BLE001 - a failing step fails its requests, not the server
            log.exception("engine step failed; failing the %d requests in flight", len(self._groups))
            events = [Failure(rid, 500, "internal error while generating") for rid in self._groups]
            for rid in list(self._groups):
                self.engine.cancel(rid)
            try:  # collects the cancellations (their events go nowhere); with no rows it runs no model
                self.engine.step()
            except Exception:  # noqa: BLE001 - still broken: the next loop turn tries again
                log.exception("engine step failed again with no request in flight")
        if self.on_step is not None:
            try:
                self.on_step([e for e in events if isinstance(e, Event)], time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - metrics must never stop the engine
                log.exception("the step callback failed")
        self._deliver(events)

    def _pending(self):
        """The commands queued so far, in order (without waiting)."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _drain_commands(self) -> None:
        for cmd in self._pending():
            if isinstance(cmd, Add):
                self._add(cmd)
            elif isinstance(cmd, Cancel):
                if cmd.request_id in self._groups:
                    self.engine.cancel(cmd.request_id)
            elif isinstance(cmd, Shutdown):
                self._stopping = cmd.message

    def _add(self, cmd: Add) -> None:
        if cmd.future.cancelled():  # the handler went away before the engine saw it
            return
        try:
            rid = self.engine.add_request(cmd.prompt, cmd.params)
        except Exception as e:  # noqa: BLE001 - handed to the submitter, who answers 4xx
            _resolve(cmd.future, exception=e)
            return
        self._groups[rid] = cmd.group
        if not cmd.group.stream:
            self._held[rid] = []
        if not _resolve(cmd.future, result=Submitted(rid, len(self.engine.request(rid).prompt_ids))):
            self.engine.cancel(rid)  # nobody will read it

    def _deliver(self, events: list[Event | Failure]) -> None:
        """Hand the step's events to their groups: one hop onto the event loop per group."""
        batches: dict[int, tuple[Group, list[Event | Failure]]] = {}
        for ev in events:
            group = self._groups.get(ev.request_id)
            if group is None:
                continue
            finished = isinstance(ev, Failure) or ev.finished
            if finished:
                del self._groups[ev.request_id]
                self.engine.release(ev.request_id)
            held = self._held.get(ev.request_id)
            if held is not None:
                held.append(ev)
                if not finished:
                    continue
                del self._held[ev.request_id]
                batches.setdefault(id(group), (group, []))[1].extend(held)
            else:
                batches.setdefault(id(group), (group, []))[1].append(ev)
        for group, items in batches.values():
            try:
                group.loop.call_soon_threadsafe(group.items.put_nowait, items)
            except Exception:  # noqa: BLE001 - a closed loop (shutdown) or a gone handler: contain it
                log.warning("could not deliver to a request's handler; cancelling it", exc_info=True)
                for item in items:
                    if item.request_id in self._groups:
                        self.engine.cancel(item.request_id)

    def _fail_everything(self, status: int, message: str) -> None:
        """Every request in flight gets a Failure; every pending submit is refused."""
        failures: list[Event | Failure] = [Failure(rid, status, message) for rid in list(self._groups)]
        for f in failures:
            try:
                self.engine.cancel(f.request_id)
            except Exception:  # noqa: BLE001 - the engine may be what broke
                pass
        self._held = {rid: [] for rid in self._held}  # a failed request's partial answer is not delivered
        try:
            self._deliver(failures)
        except Exception:  # noqa: BLE001
            log.exception("could not deliver the failures")
        for cmd in self._pending():
            if isinstance(cmd, Add):
                _resolve(cmd.future, exception=Unavailable(message))


def _resolve(fut: concurrent.futures.Future, result=None, exception: BaseException | None = None) -> bool:
    """Set a future's outcome unless its waiter is gone; True if it was set."""
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
        return True
    except concurrent.futures.InvalidStateError:  # cancelled by a handler that went away
        return False
