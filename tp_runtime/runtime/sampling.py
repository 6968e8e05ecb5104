"""Sampling parameters and the sampler.

Defaults come from the engine's generation_config.json (its do_sample, temperature, top_k,
top_p, repetition_penalty and EOS ids); a value given by the caller overrides it. Greedy when
do_sample is off, when temperature is 0, or when top_k is 1 (TensorRT-LLM's run.py default).
Order, as in transformers: repetition penalty, presence / frequency penalties (OpenAI's, over the
tokens generated so far), temperature, top-k, top-p, then a draw.
Log-probs are taken from the raw logits, before any of these.
"""

from dataclasses import dataclass, field, replace

import torch

from tp_runtime.errors import UserError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    greedy: bool | None = None  # None: from generation_config (do_sample) and the values above

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserError(f"max_tokens / --max_output_len must be a positive integer, got {self.max_tokens!r}")
        if self.temperature is not None and not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop words must be non-empty strings")

    def resolved(self, generation_config: dict | None) -> "SamplingParams":
        """Fill the unset values from generation_config.json, then pick greedy or sampling."""
        gen = generation_config or {}
        out = replace(self)
        for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if getattr(out, name) is None and gen.get(name) is not None:
                setattr(out, name, gen[name])
        out.temperature = 1.0 if out.temperature is None else float(out.temperature)
        out.top_k = 0 if out.top_k is None else int(out.top_k)
        out.top_p = 1.0 if out.top_p is None else float(out.top_p)
        out.repetition_penalty = 1.0 if out.repetition_penalty is None else float(out.repetition_penalty)
        out.seed = 0 if out.seed is None else int(out.seed)
        if out.greedy is None:
            explicit = any(getattr(self, n) is not None for n in ("temperature", "top_k", "top_p"))
            out.greedy = not (explicit or gen.get("do_sample", False))
        if out.temperature == 0 or out.top_k == 1:
            out.greedy = True
        out.validate()
        return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by the penalty if positive, else multiplied."""
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: (vocab,), already divided by the temperature. Removed entries become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= 1 - top_p
        remove_sorted[-1] = False  # always keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class RowSampler:
    """One sequence's sampler: its own parameters and its own seeded random stream, so a row
    samples the same tokens whether it runs alone or in a batch."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int):
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.counts = None  # how often each token was generated, for the presence / frequency penalties
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) float32 on the CPU."""
        p = self.params
        if self.seen is not None:
            logits = apply_repetition_penalty(logits.clone(), self.seen, p.repetition_penalty)
        if self.counts is not None:  # OpenAI's rule: logit - count * frequency - (count > 0) * presence
            logits = logits - self.counts * p.frequency_penalty - (self.counts > 0).float() * p.presence_penalty
        if p.greedy:
            token = int(torch.argmax(logits))
        else:
            filtered = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
            probs = filtered.softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        return token
