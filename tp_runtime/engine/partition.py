"""Which part of every canonical tensor each rank owns: pure functions of the global sizes and (rank, world).

The converter cuts tensors with these rules (convert/partition.py); the runtime runs them again on the
whole-tensor coordinates when it re-slices an engine for another tp size at load (runtime/reslice.py). Both
read them here, so the two can never disagree about which heads, columns or vocabulary rows a rank holds.

    heads        q/k/v by whole heads, KV groups split (unevenly at group granularity) or replicated
    intermediate the MLP's columns, balanced (the first ranks take one more when uneven)
    vocabulary   padded to a multiple of tp, an equal share of rows per rank
"""

from dataclasses import dataclass

from tp_runtime.errors import UserError

# The rule of each canonical tensor, named by the adapters and applied here. COLUMN splits the MLP's
# intermediate dim; ROW_ATTN splits dense's input by the rank's query heads; ROW_MLP splits proj's input
# by the rank's intermediate columns; QKV splits by whole heads; VOCAB pads the vocabulary to a multiple of tp.
REPLICATE, COLUMN, ROW_ATTN, ROW_MLP, QKV, VOCAB = "replicate", "column", "row_attn", "row_mlp", "qkv", "vocab"


def balanced_sizes(total: int, world: int) -> list[int]:
    """Split `total` items over `world` ranks, the first ranks taking one more when uneven."""
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def ranges_from_sizes(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


@dataclass(frozen=True)
class HeadSplit:
    """Which attention heads rank r owns. Head indices are global."""

    q_heads: tuple[int, int]  # [start, end) of query heads
    kv_heads: tuple[int, int]  # [start, end) of key/value heads (one head, replicated, when tp > kv heads)

    @property
    def num_heads_per_rank(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def valid_tp_sizes(num_heads: int, num_kv_heads: int, limit: int | None = None) -> list[int]:
    limit = limit or num_heads
    return [t for t in range(1, limit + 1) if _head_split_problem(num_heads, num_kv_heads, t) is None]


def _head_split_problem(num_heads: int, num_kv_heads: int, tp: int) -> str | None:
    if tp < 1:
        return "tp_size must be >= 1"
    if num_heads % num_kv_heads:
        return f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
    if tp <= num_kv_heads:
        return None  # whole KV groups per rank, uneven at group granularity when needed
    if tp % num_kv_heads:
        return f"tp_size={tp} exceeds num_key_value_heads={num_kv_heads} and is not a multiple of it"
    group = num_heads // num_kv_heads
    ranks_per_group = tp // num_kv_heads
    if group % ranks_per_group:
        return (
            f"tp_size={tp} replicates each KV head on {ranks_per_group} ranks, "
            f"but a KV group's {group} query heads do not split over {ranks_per_group} ranks"
        )
    return None


def head_splits(num_heads: int, num_kv_heads: int, tp: int, model: str = "model") -> list[HeadSplit]:
    """The GQA rule.

    - tp <= num_kv_heads: KV groups are split across ranks, uneven at group granularity
      (3 groups on 2 ranks -> 2 + 1); each rank takes its groups' query heads.
    - tp > num_kv_heads: tp must be a multiple of num_kv_heads; each KV head is replicated on
      tp / num_kv_heads ranks, which split its group's query heads evenly.
    """
    problem = _head_split_problem(num_heads, num_kv_heads, tp)
    if problem:
        raise UserError(
            f"{model}: cannot split {num_heads} attention heads / {num_kv_heads} KV heads over tp_size={tp}: "
            f"{problem}; valid tp sizes: {', '.join(map(str, valid_tp_sizes(num_heads, num_kv_heads)))}"
        )
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        kv_ranges = ranges_from_sizes(balanced_sizes(num_kv_heads, tp))
        return [HeadSplit((a * group, b * group), (a, b)) for a, b in kv_ranges]
    ranks_per_group = tp // num_kv_heads
    q_per_rank = group // ranks_per_group
    splits = []
    for r in range(tp):
        kv = r // ranks_per_group
        q0 = r * q_per_rank
        splits.append(HeadSplit((q0, q0 + q_per_rank), (kv, kv + 1)))
    return splits


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


@dataclass(frozen=True)
class RankPlan:
    """Everything that decides rank r's slices, computed once from the global shapes."""

    rank: int
    tp: int
    heads: HeadSplit
    mlp_span: tuple[int, int]  # [start, end) of the intermediate dim

    @property
    def mlp_size(self) -> int:
        return self.mlp_span[1] - self.mlp_span[0]


def plan_ranks(
    num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int, model: str = "model"
) -> list[RankPlan]:
    splits = head_splits(num_heads, num_kv_heads, tp, model)
    if intermediate_size < tp:
        raise UserError(f"{model}: intermediate_size={intermediate_size} is smaller than tp_size={tp}")
    mlp = ranges_from_sizes(balanced_sizes(intermediate_size, tp))
    return [RankPlan(r, tp, splits[r], mlp[r]) for r in range(tp)]


def row_span(rule: str, plan: RankPlan, head_dim: int) -> tuple[int, int] | None:
    """[start, end) of the inputs a row-parallel weight keeps on this rank (None for other rules)."""
    if rule == ROW_ATTN:
        q0, q1 = plan.heads.q_heads
        return q0 * head_dim, q1 * head_dim
    if rule == ROW_MLP:
        return plan.mlp_span
    return None
