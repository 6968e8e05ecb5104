"""Re-slicing at load: an engine converted at tp N, run on M ranks, without a re-conversion.

Each rank of M reads only the slices it needs from the N rank files and assembles its tensors exactly as
tp-convert would have written them at tp M. The partition rules (engine/partition.py) run twice on the
whole-tensor coordinates: once at N, to know which rows or columns of each canonical tensor every source file
holds, once at M, to know which rows or columns the target rank needs; the overlap says which bytes to read.

    tensor                          split along           source coordinates (tp N)       target (tp M)
    attention.qkv (+ bias)          rows: [q; k; v]        q, k, v head ranges per rank    its heads' rows
    mlp.fc, mlp.gate (+ biases)     rows                   intermediate spans              its span
    attention.dense, mlp.proj       inputs (dim 1)         q-head / intermediate spans     its span
    lm_head (+ vocab-parallel emb.) rows                   padded vocab / N per rank       padded vocab / M,
                                                                                           zeros past vocab_size
    everything else                 replicated             any rank's copy                 the same

Quantized linears slice their parts with the weight: codes, scales and zeros of row-split tensors by output
rows; of input-split tensors by inputs, in stored units (int4 codes two inputs a byte, int4 scales and zeros
one column a group; int8's per-channel scales and zeros are per row, so replicated), and an AWQ prequant
factor (in,) with the inputs. Since the converter quantized each canonical tensor whole before slicing,
slicing its slices again gives the codes a conversion at M writes. A split at M that would cut an int4
group (or a packed byte) is refused.

A replicated tensor is read from the source rank that holds the target rank's first query head, so a rank
opens only the files whose slices it needs (at 4 -> 2, rank 1 reads files 2 and 3, and of file 1 only the one
lm_head row where the two vocabulary splits cross; nothing of file 0).
KV heads replicated at N (tp > KV heads) are read from the first rank that holds them; at M they are
replicated again as head_splits says. A tied embedding stored once at tp 1 is sliced into a separate
lm_head at M > 1, and a tied lm_head is dropped at M = 1, as the converter does.

Memory: `ReslicedTensors` builds each tensor when the model takes it, from mapped source files (only the
pages of the slices are touched), so one layer is in flight, as with one rank file.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch

from tp_runtime.engine import format as ef
from tp_runtime.engine import partition as pt
from tp_runtime.errors import UserError
from tp_runtime.runtime.rank_file import STORED_DTYPES, LazyTensors, is_weight

# The split linears of a layer (transformer.layers.{i}.<module>.<part>) and their rules.
LINEAR_RULES = {"attention.qkv": pt.QKV, "attention.dense": pt.ROW_ATTN, "mlp.fc": pt.COLUMN,
                "mlp.gate": pt.COLUMN, "mlp.proj": pt.ROW_MLP}
ROW_RULES = {pt.ROW_ATTN: "attention.dense", pt.ROW_MLP: "mlp.proj"}


@dataclass(frozen=True)
class Slicing:
    """How one rank-file tensor is split: `rule` along `axis` (None: replicated), `unit` canonical
    coordinates per stored element along it (2 for packed int4 codes, the group size for int4 scales)."""

    rule: str
    axis: int | None = None
    unit: int = 1


@dataclass(frozen=True)
class Segment:
    """Global coordinates [start, end) of one component, held by source rank `rank` from `offset` on."""

    start: int
    end: int
    rank: int
    offset: int


def _segments(ranges: list[tuple[int, int]], offsets: list[int]) -> list[Segment]:
    """One segment per rank's range, a range already held by an earlier rank (replicated KV heads) skipped."""
    out, covered = [], set()
    for r, ((a, b), off) in enumerate(zip(ranges, offsets)):
        if (a, b) not in covered and b > a:
            covered.add((a, b))
            out.append(Segment(a, b, r, off))
    return out


class Reslicer:
    """Everything decided before any tensor data is read: the tp-M config, each tensor's slicing, and the
    source segments of each component. Raises UserError for an impossible M (heads, MLP, int4 groups)."""

    def __init__(self, engine_dir: str, cfg: ef.EngineConfig, tp_size: int):
        self.engine_dir, self.source, self.tp = engine_dir, cfg, tp_size
        n, name = cfg.tp_size, cfg.source_architecture
        where = f"--tp_size {tp_size}: re-slicing the engine {engine_dir} (converted at tp_size={n})"
        if tp_size < 1:
            raise UserError(f"{where}: --tp_size must be >= 1")
        D = cfg.head_size
        self.src_plans = pt.plan_ranks(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, n,
                                       name)
        if ([p.heads.num_heads_per_rank for p in self.src_plans] != list(cfg.heads_per_rank)
                or [p.heads.num_kv_heads_per_rank for p in self.src_plans] != list(cfg.kv_heads_per_rank)
                or [p.mlp_size for p in self.src_plans] != list(cfg.intermediate_size_per_rank)
                or cfg.vocab_size_padded != pt.padded_vocab_size(cfg.vocab_size, n)):
            raise UserError(f"{where}: its per-rank split sizes do not follow this tp_runtime's partition rules; "
                            f"re-run tp-convert with --tp_size {tp_size}")
        self.headers = [ef.read_safetensors_header(os.path.join(engine_dir, ef.rank_file(r)))[0] for r in range(n)]
        for h in self.headers:
            h.pop("__metadata__", None)
        try:
            self.plans = pt.plan_ranks(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
                                       tp_size, name)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        self._check_groups(where)
        self.config = dataclasses.replace(
            cfg, mapping=dict(cfg.mapping, world_size=tp_size, tp_size=tp_size),
            vocab_size_padded=pt.padded_vocab_size(cfg.vocab_size, tp_size),
            heads_per_rank=[p.heads.num_heads_per_rank for p in self.plans],
            kv_heads_per_rank=[p.heads.num_kv_heads_per_rank for p in self.plans],
            intermediate_size_per_rank=[p.mlp_size for p in self.plans])
        self.config.validate(where)

        # Source segments of each component, in canonical coordinates.
        src, V, P = self.src_plans, cfg.vocab_size, cfg.vocab_size_padded // n
        q = [(p.heads.q_heads[0] * D, p.heads.q_heads[1] * D) for p in src]
        kv = [(p.heads.kv_heads[0] * D, p.heads.kv_heads[1] * D) for p in src]
        nq = [p.heads.num_heads_per_rank * D for p in src]
        nkv = [p.heads.num_kv_heads_per_rank * D for p in src]
        self.segments = {
            "q": _segments(q, [0] * n),
            "k": _segments(kv, nq),
            "v": _segments(kv, [a + b for a, b in zip(nq, nkv)]),
            "mlp": _segments([p.mlp_span for p in src], [0] * n),
            "vocab": _segments([(min(r * P, V), min((r + 1) * P, V)) for r in range(n)], [0] * n),
        }

        # The target's tensor names: the source's, with a tied lm_head added or dropped as the converter would.
        names = list(self.headers[0])
        quant_head = any(x.startswith("lm_head.") and x != ef.LM_HEAD for x in names)
        tied_once = cfg.tie_word_embeddings and (tp_size == 1 or cfg.use_parallel_embedding) and not quant_head
        self.head_from_embedding = ef.LM_HEAD not in names and not tied_once
        if tied_once:
            names = [x for x in names if x != ef.LM_HEAD]
        elif self.head_from_embedding:
            names.append(ef.LM_HEAD)
        self.names = names

    # --- checks ---

    def _int4_row_split(self) -> bool:
        """Whether the row-parallel linears hold packed int4 codes, or int8 codes per group (GGUF's Q8_0)."""
        row_split = (".attention.dense.", ".mlp.proj.")
        return any((e["dtype"] == "U8" and n.endswith(tuple(f"{r}weight" for r in row_split)))
                   or n.endswith(tuple(f"{r}{ef.GROUP_SCALE}" for r in row_split))
                   for n, e in self.headers[0].items())

    def _group_problem(self, plans) -> str | None:
        g = self.source.quantization.get("group_size") or -1
        D = self.source.head_size
        for rule, linear in ROW_RULES.items():
            for p in plans:
                a, b = pt.row_span(rule, p, D)
                where = f"rank {p.rank}'s input slice [{a}, {b}) of {linear}"
                if g == -1 and (a % 2 or b % 2):
                    return f"{where} has odd ends, but int4 packs two inputs a byte"
                if g != -1 and (a % g or b % g):
                    return f"{where} cuts the int4 groups of group_size {g}"
        return None

    def _check_groups(self, where: str) -> None:
        if not self._int4_row_split():
            return
        problem = self._group_problem(self.plans)
        if problem is None:
            return
        cfg = self.source
        valid = []
        for m in pt.valid_tp_sizes(cfg.num_attention_heads, cfg.num_key_value_heads):
            if m <= cfg.intermediate_size:
                plans = pt.plan_ranks(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, m)
                if self._group_problem(plans) is None:
                    valid.append(m)
        raise UserError(f"{where}: {problem}; the int4 groups of this engine allow --tp_size "
                        f"{', '.join(map(str, valid))}")

    # --- per tensor ---

    def slicing(self, name: str) -> Slicing:
        if name == ef.EMBEDDING:
            return Slicing(pt.VOCAB, 0) if self.source.use_parallel_embedding else Slicing(pt.REPLICATE)
        if name.startswith("lm_head."):
            return Slicing(pt.REPLICATE) if name.endswith(ef.PREQUANT) else Slicing(pt.VOCAB, 0)
        module, _, part = name.rpartition(".")
        rule = next((r for m, r in LINEAR_RULES.items() if module.endswith("." + m)), None)
        if rule is None:
            return Slicing(pt.REPLICATE)
        if rule not in ROW_RULES:
            return Slicing(pt.REPLICATE) if part in (ef.PREQUANT, ef.ACT_SCALE) else Slicing(rule, 0)
        if part == ef.PREQUANT:
            return Slicing(rule, 0)
        if part == "weight":
            return Slicing(rule, 1, 2 if self.headers[0][name]["dtype"] == "U8" else 1)
        g = self.source.quantization.get("group_size") or -1
        if part in (ef.INT4_SCALE, ef.ZERO, ef.MINIMUM) and len(self.headers[0][name]["shape"]) == 2 and g != -1:
            return Slicing(rule, 1, g)
        return Slicing(pt.REPLICATE)  # row-parallel bias, per-channel scales and zeros, static activation steps

    def needs(self, rule: str, rank: int) -> list[tuple[str, int, int]]:
        """(component, start, end) in canonical coordinates that target `rank` holds, in stored order."""
        p, D = self.plans[rank], self.source.head_size
        if rule == pt.QKV:
            (q0, q1), (k0, k1) = p.heads.q_heads, p.heads.kv_heads
            return [("q", q0 * D, q1 * D), ("k", k0 * D, k1 * D), ("v", k0 * D, k1 * D)]
        if rule in (pt.COLUMN, pt.ROW_MLP):
            return [("mlp", *p.mlp_span)]
        if rule == pt.ROW_ATTN:
            return [("q", *pt.row_span(rule, p, D))]
        if rule == pt.VOCAB:
            per_rank = self.config.vocab_size_padded // self.tp
            return [("vocab", rank * per_rank, (rank + 1) * per_rank)]
        raise ValueError(f"rule {rule} is not split")

    def home(self, rank: int) -> int:
        """The source rank that holds target `rank`'s first query head: where its replicated tensors are read."""
        first = self.plans[rank].heads.q_heads[0] * self.source.head_size
        return next(s.rank for s in self.segments["q"] if s.start <= first < s.end)

    def source_name(self, name: str) -> tuple[str, Slicing]:
        """The source tensor a target tensor is cut from, and how the source holds it."""
        if name == ef.LM_HEAD and self.head_from_embedding:
            return ef.EMBEDDING, self.slicing(ef.EMBEDDING)
        return name, self.slicing(name)

    def pieces(self, name: str, rank: int) -> tuple[str, Slicing, list[tuple[int | None, int, int]], list[int]]:
        """(source name, its slicing, [(source rank or None for zeros, stored start, stored length)], target shape)
        of target tensor `name` on `rank`."""
        src_name, src_slicing = self.source_name(name)
        slicing = self.slicing(name)
        shape = list(self.headers[0][src_name]["shape"])
        if slicing.axis is None:
            return src_name, slicing, [(self.home(rank), 0, 0)], shape  # one copy, whole
        axis, unit = slicing.axis, slicing.unit
        out = []
        for component, a, b in self.needs(slicing.rule, rank):
            segments = (self.segments[component] if src_slicing.axis is not None
                        else [Segment(0, self.source.vocab_size, self.home(rank), 0)])  # a replicated source
            pos = a
            for s in segments:
                lo, hi = max(pos, s.start), min(b, s.end)
                if lo >= hi:
                    continue
                if lo > pos:  # a gap is only ever vocabulary padding
                    out.append((None, 0, (lo - pos) // unit))
                out.append((s.rank, (s.offset + lo - s.start) // unit, (hi - lo) // unit))
                pos = hi
            if pos < b:
                out.append((None, 0, (b - pos) // unit))
        shape[axis] = sum(n for _, _, n in out)
        return src_name, slicing, out, shape

    def rank_tensors(self, rank: int, dtype: torch.dtype, device: torch.device) -> "ReslicedTensors":
        return ReslicedTensors(self, rank, dtype, device)

    def entries(self, rank: int) -> list[tuple[str, torch.dtype, tuple]]:
        """(name, stored dtype, shape) of target rank's tensors, without reading any data."""
        out = []
        for name in self.names:
            src_name, _, _, shape = self.pieces(name, rank)
            out.append((name, STORED_DTYPES[self.headers[0][src_name]["dtype"]], tuple(shape)))
        return out

    def source_paths(self, rank: int) -> list[str]:
        """The source rank files target `rank` reads."""
        ranks = sorted({r for name in self.names for r, _, _ in self.pieces(name, rank)[2] if r is not None})
        return [os.path.join(self.engine_dir, ef.rank_file(r)) for r in ranks]


class ReslicedTensors(LazyTensors):
    """Target rank `rank`'s tensors, each assembled from the source files' slices when the model takes it,
    cast to `dtype` (float weights) and moved to `device` as RankTensors does."""

    def __init__(self, reslicer: Reslicer, rank: int, dtype: torch.dtype, device: torch.device):
        self.rs, self.rank, self.dtype, self.device = reslicer, rank, dtype, device
        self._open = {}
        super().__init__(reslicer.names)

    def _source(self, r: int):
        from safetensors import safe_open

        if r not in self._open:
            self._open[r] = safe_open(os.path.join(self.rs.engine_dir, ef.rank_file(r)), framework="pt", device="cpu")
        return self._open[r]

    def _read(self, name: str) -> torch.Tensor:
        t = self.assemble(name)
        if is_weight(name, t.dtype) and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t.to(self.device)

    def assemble(self, name: str) -> torch.Tensor:
        """The tensor as a conversion at the target tp stores it (the stored dtype, on the CPU)."""
        src_name, slicing, pieces, shape = self.rs.pieces(name, self.rank)
        stored = STORED_DTYPES[self.rs.headers[0][src_name]["dtype"]]
        if slicing.axis is None:
            source = self._source(pieces[0][0])
            if is_weight(name, stored) and stored == self.dtype and self.device.type == "cpu":
                return source.get_tensor(src_name)  # mapped, as a rank file's
            return source.get_tensor(src_name).clone()
        out = torch.empty(shape, dtype=stored)  # (..., the split axis holds the pieces side by side, ...)
        pos = 0
        for r, start, n in pieces:
            dst = out.narrow(slicing.axis, pos, n)
            if r is None:
                dst.zero_()  # vocabulary padding: zero codes, scales and zeros, masked logits
            else:
                sl = self._source(r).get_slice(src_name)
                dst.copy_(sl[start:start + n] if slicing.axis == 0 else sl[:, start:start + n])
            pos += n
        return out

    def close(self) -> None:
        self._open.clear()
