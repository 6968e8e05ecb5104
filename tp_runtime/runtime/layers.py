"""Tensor-parallel layers, built from already-sharded weights.

    ColumnParallelLinear   W_r (out_per_rank, in)     y_r = x W_r^T (+ b_r)       no communication
    RowParallelLinear      W_r (out, in_per_rank)     y = sum_r x_r W_r^T  (+ b)   all-reduce, then the
                                                                                  replicated bias once
    ParallelLMHead         W_r (vocab_padded/tp, in)  logits = gather_r(x W_r^T)[:vocab]
    Embedding              replicated: a lookup reads one row

The all-reduce lives in RowParallelLinear.forward and nowhere else; the head gathers.
A weight may be a woq.QuantWeight (weight-only int8 / int4): the layer then runs it through a
woq.WeightOnlyLinear (its kernel chosen at load) instead of a float matmul; the rest is the same.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime.runtime import native
from tp_runtime.distributed.comm import Communicator
from tp_runtime.runtime.woq import QuantWeight, WeightOnlyLinear


NATIVE_ROWS = 16  # up to this many activation rows (decode) go to tp_runtime's fp32 GEMV; more: one GEMM


def pack_weight(weight: torch.Tensor) -> tuple[nn.Parameter, str]:
    """The layout the matmul reads fastest, and how to multiply by it:
    "native": fp32 on a CPU where tp_runtime's kernels build (native.py): nn.Linear's (out, in) layout,
        decode rows through tp_woq::f32_mm (output rows split over torch's threads), prefill through F.linear.
        torch's own fp32 GEMV uses one thread whatever torch.get_num_threads() says (measured on SmolLM2's
        120 decode matmuls: 20.4 ms with 1 or 2 threads, tp_woq::f32_mm 11.7 ms with 1 and 9.0 with 2).
    "transposed": fp32 on a CPU without them: a transposed (in, out) copy, ~20 % faster than F.linear there.
    "linear": F.linear on (out, in) (bf16 runs 2x faster on it on CPU; CUDA)."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        if native.load():
            return nn.Parameter(weight.contiguous(), requires_grad=False), "native"
        return nn.Parameter(weight.t().contiguous(), requires_grad=False), "transposed"
    return nn.Parameter(weight, requires_grad=False), "linear"


def matmul(x: torch.Tensor, w: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return x @ w
    if layout == "native":
        rows = x.numel() // x.shape[-1]
        if rows <= NATIVE_ROWS:
            y = torch.ops.tp_woq.f32_mm(x.reshape(rows, x.shape[-1]).contiguous(), w)
            return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


class _Linear(nn.Module):
    """A float weight (packed by pack_weight) or a weight-only quantized one: `self.woq` then."""

    def _set_weight(self, weight):
        self.woq = None
        if isinstance(weight, QuantWeight):
            self.weight, self.layout = None, "linear"
            self.woq = WeightOnlyLinear(weight)
        else:
            self.weight, self.layout = pack_weight(weight)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.woq(x) if self.woq is not None else matmul(x, self.weight, self.layout)


class ColumnParallelLinear(_Linear):
    def __init__(self, weight, bias: torch.Tensor | None = None):
        super().__init__()
        self._set_weight(weight)  # (out_per_rank, in), or its transpose, or quantized
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y + self.bias if self.bias is not None else y


class RowParallelLinear(_Linear):
    def __init__(self, weight, bias: torch.Tensor | None, comm: Communicator):
        super().__init__()
        self._set_weight(weight)  # (out, in_per_rank), or its transpose, or quantized
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)  # partial sum of this rank's input slice
        self.comm.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias  # once, after the sum
        return y


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (vocab, hidden), replicated

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds vocab_padded / tp rows: ids outside this rank's rows look up zeros, and the
    all-reduce assembles every token's row (the one other place activations are all-reduced)."""

    def __init__(self, weight: torch.Tensor, rank: int, comm: Communicator):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (vocab_padded / tp, hidden)
        self.start = rank * weight.shape[0]
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, hidden)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(x)


class ParallelLMHead(_Linear):
    """Vocab-parallel head: each rank holds vocab_padded / tp rows; padded rows are dropped."""

    def __init__(self, weight, vocab_size: int, comm: Communicator):
        super().__init__()
        self._set_weight(weight)  # (vocab_padded / tp, hidden), or its transpose, or quantized
        self.vocab_size = vocab_size
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self._matmul(x)  # (..., vocab_padded / tp)
        logits = self.comm.all_gather(local, dim=-1)  # (..., vocab_padded)
        return logits[..., : self.vocab_size]  # padded logits never reach the sampler


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), b, self.eps).to(x.dtype)
