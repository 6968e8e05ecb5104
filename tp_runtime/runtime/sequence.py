"""One sequence as rank 0 follows it: its request, its sampler, stop words, lengths and streamed text.

The decode loop (engine_loop.py) runs the forward steps on every rank; rank 0 alone keeps a RowState per
sequence, samples its next token from the gathered logits, decides when it is done and what text is safe
to stream, so the other ranks never need the tokenizer or the sampler.
"""

from dataclasses import dataclass, field

import torch

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
    """Rank 0's book-keeping for one sequence."""

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
