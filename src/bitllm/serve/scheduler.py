"""The engine loop: one thread owns the model's running `Batch` and decodes every active request in
one batched step (continuous batching: requests join and leave between steps).

The async web handlers never touch the Batch. They `submit_many` a request's sequences (its
prompts and choices; answered at once with `QueueFull` when the waiting queue cannot take them
all), read their events from asyncio queues, and `cancel` them when the client goes away. The loop thread admits waiting requests, cancels what was asked, drops
requests past their deadline, calls `Batch.step()` once, and forwards each step's text pieces.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bitllm.engine.sampling import SamplingParams

log = logging.getLogger("bitllm.serve")


class QueueFull(Exception):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Event:
    """What a handler reads: kind "text" (a piece, and the log-probability records of the tokens
    generated since the last event when they were asked for), "prompt" (the prompt's records, once
    it has been fed), "done" (finish_reason, usage) or "error" (message)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500
    logprobs: list = field(default_factory=list)


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    id: int = 0
    seq_id: int | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    logprobs_sent: int = 0  # generated tokens whose records went out
    prompt_sent: bool = False  # the prompt's records went out
    ended: bool = False  # its last event ("done" or "error") went out: a later cancel is not a cancellation
    shares_prompt: bool = False  # a prompt's choice after the first: the first counts the prompt's tokens



def _deliver_all(items: list[tuple[Request, Event]]) -> None:
    for req, event in items:
        req.events.put_nowait(event)


class Metrics:
    """Counters the engine loop and the handlers update, rendered in Prometheus' text format."""

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
    WINDOW = 10.0  # seconds of steps behind bitllm_tokens_per_second

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status code) -> n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.timeouts = 0
        self.rejected = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.batch_hist = [0] * (len(self.BUCKETS) + 1)  # per-bucket counts, last = +Inf
        self.batch_sum = 0
        self.recent: collections.deque = collections.deque()  # (end time, tokens) of recent steps for tok/s
        self.first_step: float | None = None  # when the first step began: the rate's window starts no earlier

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def step(self, size: int, seconds: float, tokens: int | None = None) -> None:
        """One engine step of `size` sequences that generated `tokens` tokens (default: one each; a
        step that only fed part of a long scored prompt generates none)."""
        now = self.clock()
        with self.lock:
            if self.first_step is None:
                self.first_step = now - seconds
            self.steps += 1
            self.step_seconds += seconds
            self.batch_sum += size
            self.batch_hist[next((i for i, b in enumerate(self.BUCKETS) if size <= b), len(self.BUCKETS))] += 1
            self.recent.append((now, size if tokens is None else tokens))
            while self.recent and self.recent[0][0] <= now - self.WINDOW:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 s (each step yields one token per sequence): the
        tokens of the steps that ended in the window over its length, or over the time since the first
        step began when the server is younger than that (not since the first recent step, which reads
        far too high when few steps are recent)."""
        now = self.clock()
        with self.lock:
            tokens = sum(n for t, n in self.recent if t > now - self.WINDOW)
            first = self.first_step
        if not tokens:
            return 0.0
        return tokens / max(min(self.WINDOW, now - first), 1e-3)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        with self.lock:
            metric("bitllm_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(f'{{endpoint="{e}",code="{c}"}}', n) for (e, c), n in sorted(self.requests.items())] or [("", 0)])
            metric("bitllm_prompt_tokens_total", "counter", "Prompt tokens admitted (each prompt once, whatever n).", [("", self.prompt_tokens)])
            metric("bitllm_completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
            metric("bitllm_cancelled_total", "counter", "Requests cancelled because the client went away.", [("", self.cancelled)])
            metric("bitllm_timeouts_total", "counter", "Requests stopped at their deadline.", [("", self.timeouts)])
            metric("bitllm_rejected_total", "counter", "Requests refused with 429 (queue full).", [("", self.rejected)])
            metric("bitllm_engine_step_seconds_total", "counter", "Time spent in batched engine steps.", [("", self.step_seconds)])
            cum, samples = 0, []
            for b, n in zip(self.BUCKETS, self.batch_hist):
                cum += n
                samples.append((f'_bucket{{le="{b}"}}', cum))
            samples += [('_bucket{le="+Inf"}', self.steps), ("_sum", self.batch_sum), ("_count", self.steps)]
            out.append("# HELP bitllm_batch_size Sequences in each batched engine step.\n# TYPE bitllm_batch_size histogram")
            out.extend(f"bitllm_batch_size{s} {v:g}" for s, v in samples)
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        metric("bitllm_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.", [("", self.tokens_per_second())])
        return "\n".join(out) + "\n"


class EngineLoop:
    """Owns `llm.batch()` in one thread; `max_batch` sequences decode together, `max_queue` may wait."""

    def __init__(self, llm, *, max_batch: int = 16, max_queue: int = 64, timeout: float = 300.0,
                 metrics: Metrics | None = None) -> None:
        self.llm = llm
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout = timeout
        self.metrics = metrics or Metrics()
        self.batch = llm.batch()
        self._waiting: collections.deque[Request] = collections.deque()
        self._live: dict[int, Request] = {}  # seq_id -> request
        self._cancel: list[Request] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._outbox: list[tuple[Request, Event]] = []  # events of this iteration, handed over at once
        self._thread = threading.Thread(target=self._run, name="bitllm-engine", daemon=True)

    # -- called from the web handlers (any thread) ----------------------------------------------

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def submit_many(self, jobs: list[tuple[list[int], SamplingParams]], timeout: float | None = None,
                    n: int = 1) -> list[Request]:
        """Queue several sequences at once (one HTTP request's prompts and choices, `n` choices per
        prompt one after the other): all of them, or none and QueueFull when the queue cannot take them
        all. Each one's events arrive on its `request.events`."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if len(self._waiting) + len(jobs) > self.max_queue:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFull(self._retry_after())
            deadline = time.monotonic() + (timeout or self.timeout)
            reqs = [Request(prompt, params, deadline, loop, asyncio.Queue(), id=next(self._ids),
                            shares_prompt=k % n > 0) for k, (prompt, params) in enumerate(jobs)]
            self._waiting.extend(reqs)
            self._cond.notify()
        return reqs

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone): its sequence is cancelled and its KV cache slot freed."""
        with self._cond:
            if req.cancelled:
                return
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                with self.metrics.lock:
                    self.metrics.cancelled += 1
            else:
                self._cancel.append(req)
                self._cond.notify()

    def depth(self) -> tuple[int, int]:
        """(waiting, live) request counts."""
        with self._cond:
            return len(self._waiting), len(self._live)

    def kv_sequences(self) -> int:
        """Sequences holding a KV cache slot in the engine (the native engine's own count when it has one)."""
        engine = getattr(self.llm.backend, "engine", None)
        if engine is not None and hasattr(engine, "num_sequences"):
            return int(engine.num_sequences())
        return self.batch.open_slots  # the engine thread's counter: the web thread must not walk batch.seqs

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the queue drains about max_batch requests per
        (average request length / tok/s); at least 1."""
        rate = self.metrics.tokens_per_second()
        if rate <= 0:
            return 1
        avg_len = max(1, sum(r.params.max_new_tokens for r in self._waiting) // max(1, len(self._waiting)))
        return max(1, min(60, round(len(self._waiting) * avg_len / rate)))

    # -- the loop thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._live and not self._cancel:
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    break
                cancels, self._cancel = self._cancel, []
                admit = []
                while self._waiting and len(self._live) + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
                expired = [r for r in self._waiting if time.monotonic() > r.deadline]
                for r in expired:
                    self._waiting.remove(r)
            try:
                self._housekeep(cancels, admit, expired)
                if self._live:
                    self._step()
            except Exception:  # keep serving: fail the requests in flight, start a fresh batch
                log.exception("engine step failed; failing %d live request(s)", len(self._live))
                for req in list(self._live.values()):
                    self._push(req, Event("error", text="internal error in the inference engine", status=500))
                self._drop_all()
            self._flush()
        self._drop_all()
        with self._cond:
            for req in self._waiting:
                self._push(req, Event("error", text="the server is shutting down", status=503))
            self._waiting.clear()
        self._flush()

    def _push(self, req: Request, event: Event) -> None:
        req.ended = req.ended or event.kind in ("done", "error")
        self._outbox.append((req, event))

    def _flush(self) -> None:
        """Hand this iteration's events to the handlers: one wake-up per event loop, not per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for req, event in self._outbox:
            by_loop.setdefault(req.loop, []).append((req, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # that event loop is closed (server shutting down)
                pass

    def _housekeep(self, cancels: list[Request], admit: list[Request], expired: list[Request]) -> None:
        for req in cancels:
            if req.ended:  # finished, failed or timed out before the cancel came (a sibling choice's)
                continue
            if req.seq_id is not None and req.seq_id in self._live:
                self._forget(req)
            with self.metrics.lock:
                self.metrics.cancelled += 1
        now = time.monotonic()
        for req in expired + [r for r in self._live.values() if now > r.deadline]:
            if req.seq_id is not None:
                self._forget(req)
            with self.metrics.lock:
                self.metrics.timeouts += 1
            self._push(req, Event("error", text="the request ran past the server's timeout", status=504))
        for req in admit:
            if req.cancelled:
                continue
            if now > req.deadline:
                with self.metrics.lock:
                    self.metrics.timeouts += 1
                self._push(req, Event("error", text="the request waited past the server's timeout", status=504))
                continue
            try:
                req.seq_id = self.batch.add(req.prompt, req.params)
            except Exception as e:  # bad prompt for this model: the handler validated most of it
                from bitllm.errors import BitLLMError

                self._push(req, Event("error", text=str(e) if isinstance(e, BitLLMError) else "internal error",
                               status=400 if isinstance(e, BitLLMError) else 500))
                continue
            if not req.shares_prompt:  # each prompt once, however many choices: as usage.prompt_tokens
                with self.metrics.lock:
                    self.metrics.prompt_tokens += len(req.prompt)
            with self._cond:
                self._live[req.seq_id] = req
            if self.batch.seqs[req.seq_id].finished:  # max_tokens 0
                self._deliver(req)

    def _step(self) -> None:
        t0 = time.perf_counter()
        events = self.batch.step()  # one batched forward over every live sequence
        made = sum(ev.token is not None for ev in events)  # a step that only fed part of a scored prompt made none
        self.metrics.step(len(events), time.perf_counter() - t0, made)
        with self.metrics.lock:
            self.metrics.completion_tokens += made
        for ev in events:
            req = self._live.get(ev.seq_id)
            if req is not None:
                self._deliver(req)

    def _deliver(self, req: Request) -> None:
        seq = self.batch.seqs[req.seq_id]
        if seq.params.prompt_logprobs is not None and not req.prompt_sent and seq.fed >= len(seq.prompt):
            req.prompt_sent = True
            self._push(req, Event("prompt", logprobs=list(seq.prompt_logprobs)))
        records = seq.logprobs[req.logprobs_sent:]
        req.logprobs_sent = len(seq.logprobs)
        piece = self.batch.text_delta(req.seq_id)
        if piece or records:
            self._push(req, Event("text", text=piece, logprobs=records))
        if seq.finished:
            self._push(req, Event("done", finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt),
                           completion_tokens=len(seq.generated)))
            self._forget(req)

    def _forget(self, req: Request) -> None:
        """Cancel (if still running) and release the sequence: frees its KV cache slot."""
        if req.seq_id in self.batch.seqs:
            self.batch.release(req.seq_id)
        with self._cond:
            self._live.pop(req.seq_id, None)

    def _drop_all(self) -> None:
        for req in list(self._live.values()):
            try:
                self.batch.release(req.seq_id)
            except Exception:
                pass
        with self._cond:
            self._live.clear()
        self.batch = self.llm.batch()

    def info(self) -> dict[str, Any]:
        waiting, live = self.depth()
        return {"waiting": waiting, "live": live, "max_batch": self.max_batch, "max_queue": self.max_queue}
