"""The generation loop: batched prefill, then decode steps in lockstep on every rank.

Every rank runs the same forward. The logits are gathered to every rank; rank 0 alone samples,
checks EOS / stop words / lengths, streams text, and broadcasts each step's tokens with a
"continue" flag, so the other ranks never need the tokenizer or the sampler.

Prompts of different lengths share one prefill: rows are right-padded, each row's tokens sit at
positions 0..len-1 of its own cache slot, and the causal mask (key position <= query position)
keeps the padding out of every real token's view. Each row thus equals its prompt run alone.
"""

import time
from dataclasses import dataclass, field

import torch

from tp_runtime.distributed.comm import Communicator
from tp_runtime.runtime.model import KVCache, TPDecoder
from tp_runtime.runtime.sampling import RowSampler, SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams  # resolved


@dataclass
class Completion:
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class Timings:
    ttft_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    total_s: float = 0.0


class RowState:
    """Rank 0's book-keeping for one sequence (shared with the continuous-batching loop, engine_loop.py)."""

    def __init__(self, req: Request, vocab_size: int, decode, eos_ids: set[int]):
        self.req, self.decode, self.out = req, decode, Completion()
        self.sampler = RowSampler(req.params, req.prompt_ids, vocab_size)
        self.eos = set() if req.params.ignore_eos else eos_ids
        self.stops = req.params.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.streamed = 0  # characters already streamed

    @property
    def done(self) -> bool:
        return self.out.finish_reason is not None

    def step(self, logits: torch.Tensor) -> int:
        """Sample from this row's logits (vocab,), record it, decide whether the row is done."""
        token = self.sampler(logits)
        out = self.out
        if token in self.eos:
            out.finish_reason = "stop"
            return token
        out.output_ids.append(token)
        out.output_logprobs.append(float(logits[token] - torch.logsumexp(logits, -1)))
        if self.stops or self.decode is not None:
            out.text = self.decode(out.output_ids)
        for s in self.stops:
            cut = out.text.find(s)
            if cut >= 0:
                out.text = out.text[:cut]
                out.finish_reason = "stop"
                if len(self.decode(out.output_ids[:-1])) <= cut:  # the last token only completed the stop word
                    out.output_ids.pop()
                    out.output_logprobs.pop()
                return token
        if len(out.output_ids) >= self.req.params.max_tokens:
            out.finish_reason = "length"
        return token

    def stream_delta(self) -> str:
        """Text not yet streamed; holds back what could still become a stop word."""
        text = self.out.text
        end = len(text) if self.done else len(text) - self.holdback
        if not self.done and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
            end = min(end, len(text) - 1)
        if end <= self.streamed:
            return ""
        delta, self.streamed = text[self.streamed:end], end
        return delta


class Generator:
    def __init__(self, model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device,
                 eos_ids: list[int] | None):
        self.model, self.cache, self.comm, self.device = model, cache, comm, device
        self.vocab_size = model.cfg.vocab_size
        self.eos_ids = set(eos_ids or [])

    @torch.inference_mode()
    def generate(self, requests: list[Request], decode=None, on_text=None) -> tuple[list[Completion], Timings]:
        """Run every request; rank 0's completions are the results (the others return theirs empty).

        decode(ids) -> str and on_text(index, delta) are used on rank 0 only."""
        t0 = time.perf_counter()
        outputs, timing = [], {"first": None, "prefill_tokens": 0, "decode_steps": 0, "decode_s": 0.0}
        B_max = self.cache.max_batch_size
        for start in range(0, len(requests), B_max):
            batch = requests[start : start + B_max]
            outputs += self._run_batch(batch, start, decode, on_text, t0, timing)
        total = time.perf_counter() - t0
        first = timing["first"] or total
        return outputs, Timings(
            ttft_ms=first * 1000,
            decode_tokens_per_s=timing["decode_steps"] / timing["decode_s"] if timing["decode_s"] else 0.0,
            prefill_tokens_per_s=timing["prefill_tokens"] / first if first else 0.0,
            total_s=total,
        )

    def _run_batch(self, batch, offset, decode, on_text, t0, timing):
        dev, B = self.device, len(batch)
        lens = [len(r.prompt_ids) for r in batch]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : lens[b]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        ids = ids.to(dev)
        positions = torch.arange(T, device=dev).unsqueeze(0).expand(B, T)  # (B, T)
        last = torch.tensor(lens, device=dev) - 1
        lead = self.comm.rank == 0
        rows = [RowState(r, self.vocab_size, decode, self.eos_ids) for r in batch] if lead else []
        if lead:
            timing["prefill_tokens"] += sum(lens)

        logits = self.model(ids, positions, self.cache, last)  # (B, vocab)
        pos = torch.tensor(lens, device=dev)  # where each row's next token goes
        packet = torch.zeros(B + 1, dtype=torch.long, device=dev)  # next tokens + "continue" flag
        step_start = None
        while True:
            if lead:
                host_logits = logits.float().cpu()
                for b, row in enumerate(rows):
                    if not row.done:
                        packet[b] = row.step(host_logits[b])
                        if on_text is not None:
                            delta = row.stream_delta()
                            if delta:
                                on_text(offset + b, delta)
                for b, row in enumerate(rows):
                    if not row.done and int(pos[b]) >= self.cache.max_seq_len:
                        row.out.finish_reason = "length"  # the cache is full
                packet[B] = int(not all(row.done for row in rows))
                now = time.perf_counter()
                if timing["first"] is None:
                    timing["first"] = now - t0
                if step_start is not None:
                    timing["decode_steps"] += 1
                    timing["decode_s"] += now - step_start
                step_start = now
            self.comm.broadcast(packet, src=0)
            if not int(packet[B]):
                break
            # Finished rows keep running (their tokens are ignored); clamp them inside the cache.
            step_pos = pos.clamp(max=self.cache.max_seq_len - 1).view(B, 1)
            logits = self.model(packet[:B].view(B, 1), step_pos, self.cache, torch.zeros_like(pos))
            pos = pos + 1
        if lead and on_text is not None:
            for b, row in enumerate(rows):
                delta = row.stream_delta()
                if delta:
                    on_text(offset + b, delta)
        return [row.out for row in rows] if lead else [Completion() for _ in batch]
