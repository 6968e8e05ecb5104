"""The plan stage: everything decided before any tensor data is read (the engine config, each rank's heads
and columns, each rank file's tensors with dtype and shape), from a checkpoint of real or meta tensors.
tp-convert plans first so a flag mistake is reported before any work; tp-plan plans a preset's shapes.
"""

from dataclasses import dataclass

import torch

from tp_runtime.convert import awq
from tp_runtime.convert import partition as pt
from tp_runtime.convert import quantize as qz
from tp_runtime.convert.adapters import CanonicalTensor, get_adapter
from tp_runtime.convert.partition import VOCAB
from tp_runtime.convert.shard import check_quantized_slices, prepare_tensor, rank_tensors
from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError

DTYPES = ef.DTYPES


def _checkpoint_dtype(ckpt) -> torch.dtype:
    name = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype")
    if name in DTYPES:
        return DTYPES[name]
    for n in ckpt.names():
        if ckpt.dtype(n).is_floating_point:
            return ckpt.dtype(n)
    return torch.float32


def with_awq(tensors: list, res) -> list:
    """The canonical tensors with AWQ's scales applied as each is loaded (shapes unchanged)."""
    def wrap(ct):
        return lambda meta: ct.load(True) if meta else awq.transform(ct.name, ct.load(False), res)

    return [CanonicalTensor(ct.name, ct.rule, wrap(ct)) for ct in tensors]


@dataclass
class EnginePlan:
    """Everything decided before any tensor data is read: the engine config, each rank's slices,
    and each rank file's tensors (name, dtype, shape) in file order."""

    config: ef.EngineConfig
    adapter: object
    plans: list
    tensors: list
    specs: list  # per rank: [(name, dtype, shape), ...]
    out_dtype: torch.dtype

    def rank_bytes(self, rank: int) -> int:
        return sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
                   for _, dt, shape in self.specs[rank])


def plan_engine(ckpt, tp_size: int, dtype: str = "auto", model_name: str = "model",
                max_seq_len: int | None = None, max_batch_size: int = 8,
                parallel_embedding: bool = False, quant: "qz.QuantScheme | None" = None) -> EnginePlan:
    """Plan an engine from a checkpoint; works on a checkpoint of meta tensors too (tp-plan).
    quant: weight-only quantization of the attention / MLP linears (and lm_head when it says so)."""
    if tp_size < 1:
        raise UserError(f"--tp_size must be >= 1, got {tp_size}")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    adapter = get_adapter(ckpt)
    fields = adapter.config()
    out_dtype = _checkpoint_dtype(ckpt) if dtype == "auto" else DTYPES[dtype]
    if out_dtype not in DTYPES.values():
        out_dtype = torch.float32
    plans = pt.plan_ranks(fields["num_attention_heads"], fields["num_key_value_heads"],
                          fields["intermediate_size"], tp_size, model=model_name)
    head_dim = fields["head_size"]
    tensors = adapter.tensors(fields)
    if quant is not None and quant.awq is not None:
        tensors = with_awq(tensors, quant.awq)
    if parallel_embedding:  # the embedding split by vocab rows, exactly as lm_head
        tensors = [CanonicalTensor(t.name, VOCAB, t.load) if t.name == ef.EMBEDDING else t for t in tensors]
    # A tied lm_head sharded like the embedding (tp=1, or a vocab-parallel embedding) is the embedding
    # itself: store it once, the runtime ties them.
    # A quantized head is never the (float) embedding: it is stored on its own.
    quant_head = quant is not None and quant.quantize_lm_head
    if fields["tie_word_embeddings"] and (tp_size == 1 or parallel_embedding) and not quant_head:
        tensors = [t for t in tensors if t.name != ef.LM_HEAD]

    specs = [[] for _ in range(tp_size)]
    for ct in tensors:
        meta = ct.load(True)
        if quant is not None and quant.quantizes(ct.name):
            check_quantized_slices(quant, ct, meta, plans, head_dim, model_name)
        prepared = prepare_tensor(ct, meta, quant)
        for p in plans:
            for name, s in rank_tensors(ct, prepared, p, head_dim, out_dtype):
                specs[p.rank].append((name, s.dtype, tuple(s.shape)))

    if fields["hidden_act"] not in ef.ACTIVATIONS:
        raise UserError(f"{model_name}: activation {fields['hidden_act']!r} is not supported; "
                        f"supported: {', '.join(ef.ACTIVATIONS)}")
    cfg = ef.EngineConfig(
        dtype=str(out_dtype).removeprefix("torch."),
        mapping={"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
        vocab_size_padded=pt.padded_vocab_size(fields["vocab_size"], tp_size),
        heads_per_rank=[p.heads.num_heads_per_rank for p in plans],
        kv_heads_per_rank=[p.heads.num_kv_heads_per_rank for p in plans],
        intermediate_size_per_rank=[p.mlp_size for p in plans],
        max_seq_len=max_seq_len or min(fields["max_position_embeddings"], 4096),
        max_batch_size=max_batch_size,
        use_parallel_embedding=parallel_embedding,
        **fields,
    )
    if quant is not None:
        cfg.quantization = quant.config()
    return EnginePlan(cfg, adapter, plans, tensors, specs, out_dtype)
