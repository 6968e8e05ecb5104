"""The decode loop, for every caller: requests join the running batch between decode steps and leave when done.

tp-serve runs it for as long as the server lives (continuous batching); LLM.generate (tp-run, the Python
API, tp-eval) runs it over one list of requests with `generate`, until the last one is done.

Rank 0 owns a `Scheduler`; every other rank runs `follow()`. Each request holds blocks of the paged KV cache
(kv_cache.py), handed out by rank 0's BlockManager as its tokens arrive: at admission the blocks of its
longest cached prefix plus fresh ones for the rest of its prompt, then one more whenever a decode step
starts a new block. One iteration of the loop on rank 0:

    1. drop the requests whose client went away (their blocks go back)
    2. PREFILL the admitted requests (at most max_batch_size rows run at once, and a request waits while the
       pool cannot hold its prompt): the next chunk of each row's uncached tokens, within max_num_tokens for
       the step, right-padded, at positions computed..computed+chunk-1 (the causal mask keeps the padding out
       of every real token's view, and the padding's writes fall past the row's table, in block 0); a row
       whose prompt is all computed joins the batch, and rank 0 samples its first token
    3. DECODE every running request together: one token per row at its own position. A row that needs a block
       the pool has not got takes it from the newest running request, which is preempted: its blocks go
       back, and it is admitted again (first) to recompute its tokens, then goes on where it was
    4. nothing to do: wait for a request; after a few seconds of quiet (HEARTBEAT_S, or a quarter of the
       communicator's timeout), broadcast an IDLE step so the followers' waits never reach their timeout

A failed collective (a rank or its host lost: CommError) ends the loop: every request is answered with the
error (Event.status 503: the engine is gone, not the request at fault), and no STOP is sent over the broken
communicator (it would wait for the lost ranks until the timeout).

Every step is broadcast by rank 0 as a fixed-size header, then (unless it is IDLE or STOP) a payload;
all ranks run the same forward in lockstep; the logits reach every rank and rank 0 alone samples,
with one RowState per sequence (sequence.py):

    header  int64 (HEADER_LEN,)          [kind, rows B, tokens per row T, table width NB, step number]
    payload int64 (B * (NB + T + 2),)   [block tables (B * NB) | ids (B * T) | starts (B) | lengths (B)]

Row b's tokens go to positions starts[b] .. starts[b] + T - 1; its logits are those of token lengths[b] - 1.
A row's result does not depend on its neighbours: each row attends only to its own blocks (shared prefix
blocks hold what the row would have computed), and every row samples with its own seeded RowSampler. So a
request's greedy output is the one it gets alone.
"""

import itertools
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from tp_runtime.distributed.comm import Communicator
from tp_runtime.errors import CommError, UserError
from tp_runtime.runtime.sequence import Completion, Request, RowState, Timings
from tp_runtime.runtime.kv_cache import BlockManager, KVCache, SequenceBlocks, Streaming
from tp_runtime.runtime.model import TPDecoder

HEADER_LEN = 5
IDLE, PREFILL, DECODE, STOP, SHIFT = 0, 1, 2, 3, 4
HEARTBEAT_S = 5.0  # at most; a quarter of the communicator's timeout when that is shorter


# --- the step protocol (every rank) ---

@dataclass
class Step:
    kind: int
    tables: torch.Tensor | None = None  # (B, NB) each row's block table (0: no block)
    ids: torch.Tensor | None = None  # (B, T)
    starts: torch.Tensor | None = None  # (B,) the position of each row's first token
    lengths: torch.Tensor | None = None  # (B,) each row's real tokens (the rest of T is padding)


def broadcast_step(comm: Communicator, device: torch.device, step: Step | None = None, number: int = 0) -> Step:
    """Rank 0 passes `step` and sends it; the other ranks pass None and get rank 0's."""
    header = torch.zeros(HEADER_LEN, dtype=torch.long, device=device)
    if comm.rank == 0:
        (B, T), NB = (0, 0) if step.ids is None else step.ids.shape, 0 if step.tables is None else step.tables.shape[1]
        header.copy_(torch.tensor([step.kind, B, T, NB, number]))
    comm.broadcast(header, src=0)
    kind, B, T, NB, _ = header.tolist()
    if kind in (IDLE, STOP):
        return Step(kind)
    if comm.rank == 0:
        payload = torch.cat([step.tables.reshape(-1), step.ids.reshape(-1), step.starts, step.lengths]).to(device)
    else:
        payload = torch.empty(B * (NB + T + 2), dtype=torch.long, device=device)
    comm.broadcast(payload, src=0)
    parts = payload.split([B * NB, B * T, B, B])
    return Step(kind, parts[0].view(B, NB), parts[1].view(B, T), parts[2], parts[3])


def run_step(model: TPDecoder, cache: KVCache, step: Step) -> torch.Tensor | None:
    """The forward of one PREFILL or DECODE step; logits (B, vocab), the same on every rank. A SHIFT step moves
    the keys of the blocks in its table starts[0] positions back (StreamingLLM)."""
    if step.kind == SHIFT:
        model.rerotate(cache, step.tables.reshape(-1), int(step.starts[0]))
        return None
    if step.kind not in (PREFILL, DECODE):
        return None
    B, T = step.ids.shape
    positions = step.starts.view(B, 1) + torch.arange(T, device=step.ids.device)  # (B, T)
    return model(step.ids, positions, cache, step.lengths - 1, step.tables)


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


_admissions = itertools.count()


class _Running:
    def __init__(self, req: ServeRequest, row: RowState):
        self.req, self.row = req, row
        self.blocks = SequenceBlocks()
        self.fed = list(req.request.prompt_ids)  # the tokens whose keys and values the cache holds, in order
        self.next_token = 0  # sampled, fed at the next decode step
        self.sent = 0  # output ids already handed out
        self.computed = 0  # tokens of `fed` whose keys and values are in the cache (a prefill in chunks)
        self.needs_sample = True  # its first token is still to be sampled (False once preempted after it)
        self.order = next(_admissions)  # the newest running request is preempted first
        self.dropped = 0  # StreamingLLM: positions given back between the sinks and the window
        self.sinks = 0  # StreamingLLM: positions of the sink blocks

    @property
    def pos(self) -> int:
        """Where the next fed token goes (its position in the cache)."""
        return len(self.fed) - self.dropped

    @property
    def cache_tokens(self) -> list[int]:
        """The tokens whose keys and values the cache holds, in position order."""
        return self.fed if not self.dropped else self.fed[: self.sinks] + self.fed[self.sinks + self.dropped :]


class Scheduler:
    """Rank 0's continuous-batching loop. submit() and cancel() may be called from any thread;
    step() / run() / stop() run on the engine thread."""

    def __init__(self, model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device,
                 eos_ids: list[int] | set[int], decode=None, on_step=None, prefix_cache: bool = True,
                 blocks: BlockManager | None = None, max_num_tokens: int | None = None,
                 streaming: Streaming | None = None):
        """decode(ids) -> str: the tokenizer (for text and stop words). on_step(kind, rows, seconds): called
        after every PREFILL / DECODE step (metrics). prefix_cache: reuse cached blocks of a prompt's prefix.
        blocks: the cache's manager when it outlives this scheduler (LLM keeps one across generate calls).
        max_num_tokens: the most prompt tokens a PREFILL step computes (longer prompts go in chunks, one per loop
        iteration, between the decode steps of the running requests); None: no limit. streaming: StreamingLLM's
        sinks and window (kv_cache.py; the prefix cache must then be off: moved keys are rewritten)."""
        if max_num_tokens is not None and max_num_tokens < 1:
            raise UserError(f"--max_num_tokens must be >= 1, got {max_num_tokens}")
        self.max_num_tokens = max_num_tokens
        self.streaming = streaming
        self.model, self.cache, self.comm, self.device = model, cache, comm, device
        self.on_step = on_step
        self.eos_ids, self.decode = set(eos_ids or []), decode
        self.vocab_size = model.cfg.vocab_size
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque = deque()
        self.running: list[_Running] = []  # decoding
        self.prefilling: list[_Running] = []  # admitted, their prompts not yet all computed
        self.preempted: list[_Running] = []  # oldest first; admitted before new requests
        self.blocks = blocks or BlockManager(cache.num_blocks, cache.block_size, prefix_cache)
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
        """The client went away: the request leaves at the next step boundary and frees its blocks."""
        req.cancelled = True

    @property
    def queue_length(self) -> int:
        return self.inbox.qsize() + len(self.waiting) + len(self.preempted)

    @property
    def preemptions(self) -> int:
        return self.blocks.preemptions

    @property
    def batch_size(self) -> int:
        return len(self.running) + len(self.prefilling)

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
        (self.running if run in self.running else self.prefilling).remove(run)
        self.blocks.release(run.blocks)

    def _preempt(self, run: _Running) -> None:
        """Give run's blocks back; it is admitted again, first, and recomputes its tokens."""
        self._release(run)
        run.computed = 0
        self.preempted.append(run)
        self.preempted.sort(key=lambda r: r.order)
        self.blocks.preemptions += 1

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
        for run in [r for r in self.running + self.prefilling if r.req.cancelled]:
            self._release(run)
        self.preempted = [r for r in self.preempted if not r.req.cancelled]
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        did = False
        self.prefilling += self._admit()
        if self.prefilling:
            self._prefill()
            did = True
        if self.running:
            self._decode()
            did = True
        if not did:
            self._drain_inbox(block_s)
            if not self.waiting and time.monotonic() - self.last_broadcast >= self.heartbeat_s:
                self._broadcast(Step(IDLE))
        return did

    def _admit(self) -> list[_Running]:
        """Preempted requests first (oldest first), then waiting ones in arrival order, while a step has rows
        left and the pool holds their tokens (keeping a block spare for the running requests to grow)."""
        new: list[_Running] = []
        while (self.preempted or self.waiting) and self.batch_size + len(new) < self.cache.max_batch_size:
            resumed = bool(self.preempted)
            run = self.preempted[0] if resumed else None
            tokens = run.cache_tokens if resumed else self.waiting[0].request.prompt_ids
            busy = bool(self.batch_size or new)
            too_long = self.streaming is not None and len(tokens) > self.streaming.capacity
            blocks = None if too_long else self.blocks.admit(tokens, reserve=1 if busy else 0)
            if blocks is None:
                if not busy or too_long:  # an empty pool cannot hold it: it never will
                    req = (self.preempted.pop(0) if resumed else self.waiting.popleft())
                    req = req.req if resumed else req
                    room = (f"the streaming window's {self.streaming.capacity} positions" if too_long else
                            f"the KV cache's {self.blocks.usable} blocks of {self.cache.block_size}")
                    self._emit(req, Event(finish_reason="abort", error=f"{len(tokens)} tokens do not fit {room}"))
                    continue
                break
            if resumed:
                self.preempted.pop(0)
            else:
                req = self.waiting.popleft()
                try:
                    run = _Running(req, RowState(req.request, self.vocab_size, self.decode, self.eos_ids))
                except Exception as e:  # e.g. a seed torch refuses: this request fails alone
                    self.blocks.release(blocks)
                    self._emit(req, Event(finish_reason="abort", error=f"{type(e).__name__}: {e}"))
                    continue
            run.blocks, run.computed = blocks, blocks.cached_tokens
            new.append(run)
        return new

    def _tables(self, rows: list[_Running], positions: int) -> torch.Tensor:
        """(B, NB) block tables covering `positions` positions, padded with block 0. At least 2 wide: the compiled
        step was traced with a symbolic width, which Dynamo never lets be 1 (a width of 1 would recompile)."""
        nb = max(2, self.blocks.blocks_needed(positions))
        out = torch.zeros(len(rows), nb, dtype=torch.long)
        for b, r in enumerate(rows):
            table = r.blocks.table[:nb]
            out[b, : len(table)] = torch.tensor(table, dtype=torch.long)
        return out

    def _prefill(self) -> None:
        """One PREFILL step: the next chunk of each admitted prompt, oldest first, within max_num_tokens. A row
        whose prompt is then all computed joins the running batch (sampling its first token if it has none)."""
        budget = self.max_num_tokens or sum(len(r.cache_tokens) for r in self.prefilling)
        rows, lens = [], []
        for r in self.prefilling:
            n = min(len(r.cache_tokens) - r.computed, budget - sum(lens))
            if n <= 0:
                break
            rows.append(r)
            lens.append(n)
        starts = [r.computed for r in rows]
        B, T = len(rows), max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : lens[b]] = torch.tensor(r.cache_tokens[starts[b] : starts[b] + lens[b]], dtype=torch.long)
        tables = self._tables(rows, max(s + T for s in starts))
        t0 = time.perf_counter()
        step = self._broadcast(Step(PREFILL, tables, ids, torch.tensor(starts), torch.tensor(lens)))
        logits = run_step(self.model, self.cache, step)
        done, first = [], []
        for b, r in enumerate(rows):
            r.computed += lens[b]
            self.blocks.register(r.blocks, r.cache_tokens[: r.computed])
            if r.computed == len(r.cache_tokens):
                done.append(r)
                if r.needs_sample:  # a preempted request has its next token already
                    r.needs_sample = False
                    first.append(b)
        for r in done:
            self.prefilling.remove(r)
        self.running = sorted(self.running + done, key=lambda r: r.order)
        if first:
            self._sample([rows[b] for b in first], logits[first])
        self._count("prefill", B, t0)

    def _grow(self) -> None:
        """Every running request gets the block its next position needs, oldest first; where the pool has none
        left, the newest running request is preempted (perhaps the one asking)."""
        for run in list(self.running):
            if self.streaming is not None:
                self._slide(run)
            while run in self.running and not self.blocks.grow(run.blocks, run.pos + 1):
                self._preempt(max(self.running + self.prefilling, key=lambda r: r.order))

    def _slide(self, run: _Running) -> None:
        """StreamingLLM: past the sinks and the window, run's oldest window block goes and the window's keys move
        one block back, on every rank (a SHIFT step)."""
        moved = self.streaming.make_room(run.blocks, run.pos + 1, self.blocks)
        if moved:
            bs = self.cache.block_size
            run.sinks, run.dropped = self.streaming.sink_positions, run.dropped + bs
            step = Step(SHIFT, torch.tensor([moved]), torch.zeros(1, 0, dtype=torch.long), torch.tensor([bs]),
                        torch.zeros(1, dtype=torch.long))
            run_step(self.model, self.cache, self._broadcast(step))

    def _decode(self) -> None:
        self._grow()
        rows = list(self.running)
        if not rows:
            return
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)
        positions = torch.tensor([r.pos for r in rows], dtype=torch.long)
        tables = self._tables(rows, int(positions.max()) + 1)
        t0 = time.perf_counter()
        step = self._broadcast(Step(DECODE, tables, ids, positions, torch.ones(len(rows), dtype=torch.long)))
        logits = run_step(self.model, self.cache, step)
        for r in rows:
            r.fed.append(r.next_token)
            self.blocks.register(r.blocks, r.fed)
        self._sample(rows, logits)
        self._count("decode", len(rows), t0)

    def _count(self, kind: str, rows: int, t0: float) -> None:
        if self.on_step is not None:
            self.on_step(kind, rows, time.perf_counter() - t0)

    def _sample(self, rows: list[_Running], logits: torch.Tensor) -> None:
        host = logits.float().cpu()
        for b, run in enumerate(rows):
            row, req = run.row, run.req
            try:
                run.next_token = row.step(host[b])
                if not row.done and run.pos >= self.cache.max_seq_len and self.streaming is None:
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
        for req in [r.req for r in self.running + self.prefilling + self.preempted] + list(self.waiting):
            self._emit(req, Event(finish_reason="abort", error=reason, status=503))
        for run in self.running + self.prefilling:
            self.blocks.release(run.blocks)
        self.running, self.prefilling, self.preempted, self.waiting = [], [], [], deque()
        if self.failure is not None:
            return
        try:
            broadcast_step(self.comm, self.device, Step(STOP), self.steps + 1)
        except Exception as e:  # the followers are gone already
            print(f"[tp-serve] could not tell the other ranks to stop: {e}", file=sys.stderr, flush=True)


# --- a list of requests, start to end (LLM.generate) ---

@torch.inference_mode()
def generate(model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device, eos_ids,
             requests: list[Request], decode=None, on_text=None, blocks: BlockManager | None = None,
             max_num_tokens: int | None = None, streaming: Streaming | None = None) -> tuple[list[Completion], Timings]:
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

    sched = Scheduler(model, cache, comm, device, eos_ids, decode, on_step, blocks=blocks,
                      max_num_tokens=max_num_tokens, streaming=streaming)
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
