"""The decode loop, for every caller: requests join the running batch between decode steps and leave when done.

tp-serve runs it for as long as the server lives (continuous batching); LLM.generate (tp-run, the Python
API, tp-eval) runs it over one list of requests with `generate`, until the last one is done.

Rank 0 owns a `Scheduler`; every other rank runs `follow()`. Each request holds one KV-cache slot
(a row of KVCache) from its prefill to its last token; a freed slot is taken by the next request at
once. One iteration of the loop on rank 0:

    1. drop the requests whose client went away (their slots are free again)
    2. PREFILL the waiting requests that find a free slot: their prompts, right-padded, at
       positions 0..len-1 of their slots (the causal mask keeps the padding out of every real
       token's view); rank 0 samples each one's first token
    3. DECODE every running request together: one token per row at its own position in its slot
    4. nothing to do: wait for a request; after a few seconds of quiet (HEARTBEAT_S, or a quarter of the
       communicator's timeout), broadcast an IDLE step so the followers' waits never reach their timeout

A failed collective (a rank or its host lost: CommError) ends the loop: every request is answered with the
error (Event.status 503: the engine is gone, not the request at fault), and no STOP is sent over the broken
communicator (it would wait for the lost ranks until the timeout).

Every step is broadcast by rank 0 as a fixed-size header, then (unless it is IDLE or STOP) a payload;
all ranks run the same forward in lockstep; the logits reach every rank and rank 0 alone samples,
with one RowState per sequence (sequence.py):

    header  int64 (HEADER_LEN,)   [kind, rows B, tokens per row T, step number]
    payload int64 (B * (T + 2),)  [slots (B) | ids (B * T) | prompt lengths (PREFILL) or positions (DECODE) (B)]

A row's result does not depend on its neighbours: each row attends only to its own slot, and every
row samples with its own seeded RowSampler. So a request's greedy output is the one it gets alone.
"""

import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from tp_runtime.distributed.comm import Communicator
from tp_runtime.errors import CommError
from tp_runtime.runtime.sequence import Completion, Request, RowState, Timings
from tp_runtime.runtime.model import KVCache, TPDecoder

HEADER_LEN = 4
IDLE, PREFILL, DECODE, STOP = 0, 1, 2, 3
HEARTBEAT_S = 5.0  # at most; a quarter of the communicator's timeout when that is shorter


# --- the step protocol (every rank) ---

@dataclass
class Step:
    kind: int
    slots: torch.Tensor | None = None  # (B,) cache slot of each row
    ids: torch.Tensor | None = None  # (B, T)
    lengths: torch.Tensor | None = None  # (B,) PREFILL: prompt lengths; DECODE: the position of each row's token


def broadcast_step(comm: Communicator, device: torch.device, step: Step | None = None, number: int = 0) -> Step:
    """Rank 0 passes `step` and sends it; the other ranks pass None and get rank 0's."""
    header = torch.zeros(HEADER_LEN, dtype=torch.long, device=device)
    if comm.rank == 0:
        B, T = (0, 0) if step.ids is None else step.ids.shape
        header.copy_(torch.tensor([step.kind, B, T, number]))
    comm.broadcast(header, src=0)
    kind, B, T, _ = header.tolist()
    if kind in (IDLE, STOP):
        return Step(kind)
    if comm.rank == 0:
        payload = torch.cat([step.slots, step.ids.reshape(-1), step.lengths]).to(device)
    else:
        payload = torch.empty(B * (T + 2), dtype=torch.long, device=device)
    comm.broadcast(payload, src=0)
    return Step(kind, payload[:B], payload[B : B + B * T].view(B, T), payload[B + B * T :])


def run_step(model: TPDecoder, cache: KVCache, step: Step) -> torch.Tensor | None:
    """The forward of one PREFILL or DECODE step; logits (B, vocab), the same on every rank."""
    if step.kind not in (PREFILL, DECODE):
        return None
    B, T = step.ids.shape
    dev = step.ids.device
    # Rows that are slots 0..B-1 in order read the cache as a view; others gather their slots.
    slots = None if torch.equal(step.slots, torch.arange(B, device=dev)) else step.slots
    if step.kind == PREFILL:
        positions = torch.arange(T, device=dev).unsqueeze(0).expand(B, T)  # (B, T)
        last = step.lengths - 1
    else:
        positions = step.lengths.view(B, 1)  # (B, 1)
        last = torch.zeros(B, dtype=torch.long, device=dev)
    return model(step.ids, positions, cache, last, slots)


@torch.inference_mode()
def follow(model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device) -> None:
    """A follower rank: run rank 0's steps until it broadcasts STOP."""
    while True:
        step = broadcast_step(comm, device)
        if step.kind == STOP:
            return
        run_step(model, cache, step)


# --- rank 0: requests and the scheduler ---

@dataclass
class Event:
    """What one step produced for one request (handed to its `on_event`, on the engine thread)."""
    text: str = ""  # new text (stop words held back until they are ruled out)
    token_ids: list[int] = field(default_factory=list)  # new output ids
    logprobs: list[float] = field(default_factory=list)  # one per new id
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # one list per new id, if asked
    finish_reason: str | None = None  # "stop" | "length" | "abort" (error, or the server stops)
    error: str | None = None
    status: int = 500  # with an error: 500 the request failed alone, 503 the engine stopped or failed
    time: float = 0.0  # time.monotonic() when it was produced
    completion: Completion | None = None  # the whole result, on the last event of a request


@dataclass
class ServeRequest:
    """One request: a resolved Request plus where its events go. on_event(Event) runs on the engine thread."""
    request: Request
    on_event: object
    top_logprobs: int = 0
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class _Running:
    def __init__(self, req: ServeRequest, slot: int, row: RowState):
        self.req, self.slot, self.row = req, slot, row
        self.pos = len(req.request.prompt_ids)  # where the next fed token goes
        self.next_token = 0
        self.sent = 0  # output ids already handed out


class Scheduler:
    """Rank 0's continuous-batching loop. submit() and cancel() may be called from any thread;
    step() / run() / stop() run on the engine thread."""

    def __init__(self, model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device,
                 eos_ids: list[int] | set[int], decode=None, on_step=None):
        """decode(ids) -> str: the tokenizer (for text and stop words). on_step(kind, rows, seconds): called
        after every PREFILL / DECODE step (metrics)."""
        self.model, self.cache, self.comm, self.device = model, cache, comm, device
        self.on_step = on_step
        self.eos_ids, self.decode = set(eos_ids or []), decode
        self.vocab_size = model.cfg.vocab_size
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque = deque()
        self.running: list[_Running] = []
        self.free_slots = list(range(cache.max_batch_size))  # lowest first: rows then tend to be slots 0..B-1
        self.steps = 0
        self.last_broadcast = time.monotonic()
        self.heartbeat_s = min(HEARTBEAT_S, getattr(comm, "timeout_s", HEARTBEAT_S * 4) / 4)
        self.stopped, self.stop_reason = False, ""
        self.stop_lock = threading.Lock()  # a request submitted as the loop stops is answered, never lost
        self.failure: CommError | None = None  # the collective that broke the engine, once one has

    # --- any thread ---

    def submit(self, req: ServeRequest) -> None:
        with self.stop_lock:
            if not self.stopped:
                self.inbox.put(req)
                return
        self._emit(req, Event(finish_reason="abort", error=self.stop_reason, status=503))

    def cancel(self, req: ServeRequest) -> None:
        """The client went away: the request leaves at the next step boundary and frees its slot."""
        req.cancelled = True

    @property
    def queue_length(self) -> int:
        return self.inbox.qsize() + len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    # --- the engine thread ---

    def _broadcast(self, step: Step) -> Step:
        self.steps += 1
        self.last_broadcast = time.monotonic()
        return broadcast_step(self.comm, self.device, step, self.steps)

    def _drain_inbox(self, block_s: float = 0.0) -> None:
        try:
            if block_s > 0:
                self.waiting.append(self.inbox.get(timeout=block_s))
            while True:
                self.waiting.append(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _release(self, run: _Running) -> None:
        self.running.remove(run)
        self.free_slots.append(run.slot)
        self.free_slots.sort()

    def _emit(self, req: ServeRequest, event: Event) -> None:
        event.time = time.monotonic()
        try:
            req.on_event(event)
        except Exception:  # a broken consumer loses its own request, never the loop
            req.cancelled = True

    @torch.inference_mode()
    def step(self, block_s: float = 0.0) -> bool:
        """One iteration (see the module docstring). Returns whether anything ran. A failed collective ends the
        engine: every request gets its error, then the CommError is raised."""
        try:
            return self._step(block_s)
        except CommError as e:
            self.failure = e
            self.shutdown(str(e))
            raise

    def _step(self, block_s: float) -> bool:
        self._drain_inbox()
        for run in [r for r in self.running if r.req.cancelled]:
            self._release(run)
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        did = False
        if self.waiting and self.free_slots:
            new = []
            while self.waiting and self.free_slots:
                req = self.waiting.popleft()
                try:
                    row = RowState(req.request, self.vocab_size, self.decode, self.eos_ids)
                except Exception as e:  # e.g. a seed torch refuses: this request fails alone
                    self._emit(req, Event(finish_reason="abort", error=f"{type(e).__name__}: {e}"))
                    continue
                new.append(_Running(req, self.free_slots.pop(0), row))
            if new:
                self._prefill(new)
                did = True
        if self.running:
            self._decode()
            did = True
        if not did:
            self._drain_inbox(block_s)
            if not self.waiting and time.monotonic() - self.last_broadcast >= self.heartbeat_s:
                self._broadcast(Step(IDLE))
        return did

    def _prefill(self, new: list[_Running]) -> None:
        lens = [len(r.req.request.prompt_ids) for r in new]
        B, T = len(new), max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(new):
            ids[b, : lens[b]] = torch.tensor(r.req.request.prompt_ids, dtype=torch.long)
        slots = torch.tensor([r.slot for r in new], dtype=torch.long)
        t0 = time.perf_counter()
        step = self._broadcast(Step(PREFILL, slots, ids, torch.tensor(lens, dtype=torch.long)))
        logits = run_step(self.model, self.cache, step)
        self.running += new
        self.running.sort(key=lambda r: r.slot)
        self._sample(new, logits)
        self._count("prefill", B, t0)

    def _decode(self) -> None:
        rows = self.running
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long)
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)
        positions = torch.tensor([r.pos for r in rows], dtype=torch.long)
        t0 = time.perf_counter()
        step = self._broadcast(Step(DECODE, slots, ids, positions))
        logits = run_step(self.model, self.cache, step)
        for r in rows:
            r.pos += 1
        self._sample(list(rows), logits)
        self._count("decode", len(slots), t0)

    def _count(self, kind: str, rows: int, t0: float) -> None:
        if self.on_step is not None:
            self.on_step(kind, rows, time.perf_counter() - t0)

    def _sample(self, rows: list[_Running], logits: torch.Tensor) -> None:
        host = logits.float().cpu()
        for b, run in enumerate(rows):
            row, req = run.row, run.req
            try:
                run.next_token = row.step(host[b])
                if not row.done and run.pos >= self.cache.max_seq_len:
                    row.out.finish_reason = "length"  # the cache is full (admission makes this rare)
                out = row.out
                event = Event(row.stream_delta(), out.output_ids[run.sent :], out.output_logprobs[run.sent :],
                              finish_reason=out.finish_reason, completion=out if out.finish_reason else None)
                if req.top_logprobs and event.token_ids:
                    lp = torch.log_softmax(host[b], -1)
                    top = torch.topk(lp, req.top_logprobs)
                    event.top_logprobs = [list(zip(top.indices.tolist(), top.values.tolist()))] * len(event.token_ids)
                run.sent = len(out.output_ids)
            except Exception as e:  # this request fails alone
                row.out.finish_reason = "abort"
                event = Event(finish_reason="abort", error=f"{type(e).__name__}: {e}")
            if event.text or event.token_ids or event.finish_reason:
                self._emit(req, event)
            if row.done:
                self._release(run)

    @torch.inference_mode()
    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set, then end every request and tell the followers to stop."""
        try:
            while not stop.is_set():
                self.step(block_s=0.05)
        finally:
            self.shutdown()

    @torch.inference_mode()
    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """End every request (finish_reason "abort", status 503) and broadcast STOP (unless a collective failed);
        safe to call twice."""
        with self.stop_lock:
            if self.stopped:
                return
            self.stopped, self.stop_reason = True, reason
            self._drain_inbox()
        for req in [r.req for r in self.running] + list(self.waiting):
            self._emit(req, Event(finish_reason="abort", error=reason, status=503))
        self.running, self.waiting = [], deque()
        if self.failure is not None:
            return
        try:
            broadcast_step(self.comm, self.device, Step(STOP), self.steps + 1)
        except Exception as e:  # the followers are gone already
            print(f"[tp-serve] could not tell the other ranks to stop: {e}", file=sys.stderr, flush=True)


# --- a list of requests, start to end (LLM.generate) ---

@torch.inference_mode()
def generate(model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device, eos_ids,
             requests: list[Request], decode=None, on_text=None) -> tuple[list[Completion], Timings]:
    """Run `requests` through the Scheduler until every one is done, then release the followers. Every rank
    calls it; rank 0's completions are the results (the others return empty ones). decode(ids) -> str and
    on_text(index, delta) are used on rank 0 only.

    Timings: ttft from the start to the first sampled token on rank 0; prefill tokens over that time; decode
    steps over the time of the decode steps (tokens after the first, per sequence)."""
    if comm.rank != 0:
        follow(model, cache, comm, device)
        return [Completion() for _ in requests], Timings()
    t0 = time.perf_counter()
    done: dict[int, Completion] = {}
    failed: dict[int, str] = {}
    clock = {"first": None, "decode_steps": 0, "decode_s": 0.0}

    def on_step(kind, rows, seconds):
        if clock["first"] is None:
            clock["first"] = time.perf_counter() - t0
        if kind == "decode":
            clock["decode_steps"] += 1
            clock["decode_s"] += seconds

    def collector(i):
        def on_event(event: Event):
            if event.error is not None:
                failed[i] = event.error  # raised below, once the followers are released
                return
            if event.text and on_text is not None:
                on_text(i, event.text)
            if event.completion is not None:
                done[i] = event.completion
        return on_event

    sched = Scheduler(model, cache, comm, device, eos_ids, decode, on_step)
    try:
        for i, req in enumerate(requests):
            sched.submit(ServeRequest(req, collector(i)))
        while len(done) + len(failed) < len(requests):
            sched.step()
    finally:
        sched.shutdown("generation ended early")  # STOP: the followers return
    if failed:
        i = min(failed)
        raise RuntimeError(f"request {i} failed: {failed[i]}")
    total = time.perf_counter() - t0
    first = clock["first"] or total
    prefill_tokens = sum(len(r.prompt_ids) for r in requests)
    return [done[i] for i in range(len(requests))], Timings(
        ttft_ms=first * 1000,
        decode_tokens_per_s=clock["decode_steps"] / clock["decode_s"] if clock["decode_s"] else 0.0,
        prefill_tokens_per_s=prefill_tokens / first if first else 0.0,
        total_s=total,
    )
