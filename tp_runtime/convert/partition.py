"""Partition rules: pure functions of (tensor, rule, rank, world).

Nothing here reads files or talks to other ranks, so every rule is tested in one process:
the shards, concatenated (column / vocab / qkv) or summed (row), give back the unsharded result.

Weights are stored as nn.Linear does, (out_features, in_features).

    column-parallel  W (out, in) -> W[out_r, :]        mlp.fc, mlp.gate, lm_head
    row-parallel     W (out, in) -> W[:, in_r]         attention.dense, mlp.proj (bias replicated,
                                                       added once after the all-reduce)
    qkv              per rank [q_r; k_r; v_r] along out, split by whole heads / KV groups

Which heads, columns and vocabulary rows a rank owns (head_splits, plan_ranks, row_span, ...) is decided in
engine/partition.py, shared with the runtime's re-slicing at load, and re-exported here; this module cuts
the tensors.
"""

import torch

from tp_runtime.engine.partition import (COLUMN, QKV, REPLICATE, ROW_ATTN, ROW_MLP, VOCAB, HeadSplit,  # noqa: F401
                                         RankPlan, balanced_sizes, head_splits, padded_vocab_size, plan_ranks,
                                         ranges_from_sizes, row_span, valid_tp_sizes)


def shard_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: HeadSplit, head_dim: int
) -> torch.Tensor:
    """[q_r; k_r; v_r] along dim 0 for weights (out, in) or biases (out,).

    q, k, v are separate tensors: a fused checkpoint is split per component before this,
    never chunked evenly.
    """
    (q0, q1), (k0, k1) = split.q_heads, split.kv_heads
    return torch.cat(
        [q[q0 * head_dim : q1 * head_dim], k[k0 * head_dim : k1 * head_dim], v[k0 * head_dim : k1 * head_dim]],
        dim=0,
    )


def shard_column(w: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Column-parallel: rows [start, end) of the output dim (dim 0) of a weight or bias."""
    return w[span[0] : span[1]]


def shard_row(w: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Row-parallel: columns [start, end) of the input dim (dim 1)."""
    return w[:, span[0] : span[1]]


def shard_vocab(w: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Vocab-parallel (lm_head or embedding): rows of a vocabulary padded to a multiple of tp.

    Padding rows are zeros; the runtime masks their logits, so they are never sampled.
    """
    vocab = w.shape[0]
    per_rank = padded_vocab_size(vocab, tp) // tp
    start, end = rank * per_rank, (rank + 1) * per_rank
    part = w[start : min(end, vocab)]
    missing = end - max(start, min(end, vocab))
    if missing > 0:
        part = torch.cat([part, w.new_zeros((missing,) + tuple(w.shape[1:]))], dim=0)
    return part


# ---------------------------------------------------------------------------
# a rule applied for one rank


def shard_tensor(rule: str, tensor, plan: RankPlan, head_dim: int):
    """Apply one partition rule for one rank. Works on real and on meta tensors."""
    if rule == REPLICATE:
        return tensor
    if rule == QKV:
        return shard_qkv(*tensor, plan.heads, head_dim)
    if rule == COLUMN:
        return shard_column(tensor, plan.mlp_span)
    if rule in (ROW_ATTN, ROW_MLP):
        return shard_row(tensor, row_span(rule, plan, head_dim))
    if rule == VOCAB:
        return shard_vocab(tensor, plan.rank, plan.tp)
    raise ValueError(f"unknown partition rule {rule}")
