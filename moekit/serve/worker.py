"""The engine thread: one thread owns the :class:`~moekit.infer.Engine` (which is not thread-safe) and
steps it while there is work; HTTP handlers talk to it through a command queue and receive their
request's events on an asyncio queue.

Plan of the loop: take every pending command (add a request -> resolve the submitter's future with
the request id or the engine's error; cancel a request), then, if the engine has work, run one
``engine.step()`` and hand each event to its request's queue on the event loop. New requests thus
join the running batch between two decode steps (continuous batching); a client that goes away is
cancelled, and its slot is free at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field

from moekit.infer import Engine, SamplingParams
from moekit.infer.engine import Event


@dataclass
class Subscription:
    """One request as the HTTP side sees it."""

    request_id: str
    events: asyncio.Queue  # Event objects, the last one finished
    prompt_tokens: int
    submitted: float = field(default_factory=time.perf_counter)


class EngineWorker:
    """Runs ``engine`` on a daemon thread; :meth:`submit` and :meth:`cancel` are safe from any thread."""

    def __init__(self, engine: Engine, on_step=None):
        self.engine = engine
        self.on_step = on_step  # called on the engine thread after each step with (events, seconds)
        self._commands: queue.Queue = queue.Queue()
        self._subs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moekit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    async def submit(self, prompt: str | list[int], params: SamplingParams) -> Subscription:
        """Queue a request; raises the engine's error (EngineError, EngineFull) for a bad one."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", prompt, params, loop, events, fut))
        self._wake.set()
        request_id, prompt_tokens = await asyncio.wrap_future(fut)
        return Subscription(request_id, events, prompt_tokens)

    def cancel(self, request_id: str) -> None:
        self._commands.put(("cancel", request_id))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel what is still running, then stop the thread."""
        self._commands.put(("cancel_all",))
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(deadline - time.monotonic(), 0.1))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failing step must not kill the server: fail its requests
                events = self._fail_all(e)
            if self.on_step is not None:
                self.on_step(events, time.perf_counter() - t0)
            for ev in events:
                self._deliver(ev)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, prompt, params, loop, events, fut = cmd
                try:
                    rid = self.engine.add_request(prompt, params)
                except Exception as e:  # noqa: BLE001 - handed to the submitter, who answers 4xx
                    fut.set_exception(e)
                    continue
                self._subs[rid] = (loop, events)
                fut.set_result((rid, len(self.engine.request(rid).prompt_ids)))
            elif cmd[0] == "cancel":
                self.engine.cancel(cmd[1])
            elif cmd[0] == "cancel_all":
                for rid in list(self._subs):
                    self.engine.cancel(rid)

    def _fail_all(self, error: Exception) -> list[Event]:
        events = []
        for rid in list(self._subs):
            self.engine.cancel(rid)
            events.append(Event(rid, None, "", True, f"error: {type(error).__name__}: {error}"))
        return events

    def _deliver(self, ev: Event) -> None:
        sub = self._subs.get(ev.request_id)
        if sub is None:
            return
        loop, events = sub
        if ev.finished:
            del self._subs[ev.request_id]
            self.engine.release(ev.request_id)
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is closed (server shutting down)
            pass
