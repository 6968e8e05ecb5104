"""tp-convert: a Hugging Face checkpoint -> an engine directory with one file per rank.

    HF dir --adapter--> canonical tensors (one at a time) --partition plan--> per-rank slices
           --> rank{r}.safetensors (streamed)  + config.json + tokenizer files

Memory stays bounded: one canonical tensor (q, k and v together for attention) is in memory at a
time, plus one rank's slice of it. The engine is built in a temporary sibling directory and
renamed into place at the end, so an interrupted conversion never leaves an engine that loads.
"""

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from tp_runtime.engine import format as ef
from tp_runtime.convert import partition as pt
from tp_runtime.convert import quantize as qz
from tp_runtime.convert.adapters import CanonicalTensor, get_adapter
from tp_runtime.convert.partition import COLUMN, QKV, REPLICATE, ROW_ATTN, ROW_MLP, VOCAB
from tp_runtime.convert.checkpoint import open_checkpoint
from tp_runtime.convert.prequantized import open_prequantized
from tp_runtime.errors import UserError, exit_on_user_error
from tp_runtime.convert.writer import StreamingSafetensorsWriter

DTYPES = ef.DTYPES


def shard_tensor(rule: str, tensor, plan: pt.RankPlan, head_dim: int):
    """Apply one partition rule for one rank. Works on real and on meta tensors."""
    if rule == REPLICATE:
        return tensor
    if rule == QKV:
        return pt.shard_qkv(*tensor, plan.heads, head_dim)
    if rule == COLUMN:
        return pt.shard_column(tensor, plan.mlp_span)
    if rule in (ROW_ATTN, ROW_MLP):
        return pt.shard_row(tensor, row_span(rule, plan, head_dim))
    if rule == VOCAB:
        return pt.shard_vocab(tensor, plan.rank, plan.tp)
    raise ValueError(f"unknown partition rule {rule}")


def row_span(rule: str, plan: pt.RankPlan, head_dim: int) -> tuple[int, int] | None:
    """[start, end) of the inputs a row-parallel weight keeps on this rank (None for other rules)."""
    if rule == ROW_ATTN:
        q0, q1 = plan.heads.q_heads
        return q0 * head_dim, q1 * head_dim
    if rule == ROW_MLP:
        return plan.mlp_span
    return None


def prepare_tensor(ct: CanonicalTensor, full, quant: "qz.QuantScheme | None"):
    """The unsharded tensor as the rank files will slice it: quantized once here when the scheme
    covers it (each of q, k, v on its own), else unchanged."""
    if quant is None or not quant.quantizes(ct.name):
        return full
    if isinstance(full[0] if isinstance(full, tuple) else full, qz.QuantizedWeight):
        return full  # read from a pre-quantized checkpoint: its own codes and scales
    scheme = quant.for_tensor(ct.name)
    if ct.rule == QKV:
        parts = tuple(qz.quantize_rtn(t, scheme, ct.name) for t in full)
        meta = full[0].is_meta
    else:
        parts = (qz.quantize_rtn(full, scheme, ct.name),)
        meta = full.is_meta
    for qw in parts:
        qw.pre_scale = quant.prequant(ct.name, meta)
    return parts if ct.rule == QKV else parts[0]


def with_awq(tensors: list, res) -> list:
    """The canonical tensors with AWQ's scales applied as each is loaded (shapes unchanged)."""
    from tp_runtime.convert import awq
    def wrap(ct):
        return lambda meta: ct.load(True) if meta else awq.transform(ct.name, ct.load(False), res)

    return [CanonicalTensor(ct.name, ct.rule, wrap(ct)) for ct in tensors]


def rank_tensors(ct: CanonicalTensor, prepared, plan: pt.RankPlan, head_dim: int, out_dtype: torch.dtype):
    """[(engine name, tensor)] of one canonical tensor for one rank: its slice in the engine dtype, or the
    slices of its codes, scales and zeros."""
    first = prepared[0] if isinstance(prepared, tuple) else prepared
    if isinstance(first, qz.QuantizedWeight):
        part = qz.shard_quantized(ct.rule, prepared, plan, head_dim, row_span(ct.rule, plan, head_dim))
        return qz.engine_tensors(ct.name, part)
    s = shard_tensor(ct.rule, prepared, plan, head_dim)
    return [(ct.name, s.to(out_dtype) if s.dtype.is_floating_point else s)]


def check_quantized_slices(quant: "qz.QuantScheme", ct: CanonicalTensor, meta, plans, head_dim: int,
                           model: str) -> None:
    in_features = (meta[0] if isinstance(meta, tuple) else meta).shape[1]
    spans = [row_span(ct.rule, p, head_dim) for p in plans]
    qz.check_slices(quant, ct.name, in_features, spans if spans[0] is not None else None, len(plans), model)


def _checkpoint_dtype(ckpt) -> torch.dtype:
    name = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype")
    if name in DTYPES:
        return DTYPES[name]
    for n in ckpt.names():
        if ckpt.dtype(n).is_floating_point:
            return ckpt.dtype(n)
    return torch.float32


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


def convert(
    model_dir: str,
    output_dir: str,
    tp_size: int = 1,
    dtype: str = "auto",
    force: bool = False,
    max_seq_len: int | None = None,
    max_batch_size: int = 8,
    progress: bool = True,
    parallel_embedding: bool = False,
    quant: "qz.QuantScheme | None" = None,
    calib_file: str | None = None,
    calib_samples: int = 32,
    calib_seq_len: int = 256,
    awq_clip: bool = True,
) -> ef.EngineConfig:
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not force:
        raise UserError(f"output directory {output_dir} exists; pass --force to replace it")
    ckpt, prequant = open_prequantized(open_checkpoint(model_dir))
    model_name = os.path.basename(os.path.normpath(model_dir))
    if prequant is not None:
        if quant is not None:
            raise UserError(f"{model_dir} is already quantized ({prequant.quant_algo}, group {prequant.group_size}); "
                            "convert it without --use_weight_only")
        quant = prequant
    if quant is not None and quant.algo == "awq" and not quant.prequantized and quant.awq is None:
        # plan first: a flag or group-size mistake is reported before the calibration run
        plan_engine(ckpt, tp_size, dtype, model_name, max_seq_len, max_batch_size, parallel_embedding, quant)
        quant = dataclasses.replace(quant, awq=search_awq(ckpt, model_dir, quant, calib_file, calib_samples,
                                                          calib_seq_len, progress, awq_clip))
    plan = plan_engine(ckpt, tp_size, dtype, model_name, max_seq_len, max_batch_size, parallel_embedding, quant)
    cfg, plans, tensors, specs, out_dtype = plan.config, plan.plans, plan.tensors, plan.specs, plan.out_dtype
    head_dim = cfg.head_size

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        writers = [StreamingSafetensorsWriter(os.path.join(tmp, ef.rank_file(r)), specs[r],
                                              {"format": "pt", "rank": r, "tp_size": tp_size})
                   for r in range(tp_size)]
        bar = _progress(len(tensors), progress, "converting")
        for ct in tensors:
            full = prepare_tensor(ct, ct.load(False), quant)
            for p in plans:
                for name, s in rank_tensors(ct, full, p, head_dim, out_dtype):
                    writers[p.rank].write(name, s)
                del s
            del full
            bar.update(1)
        bar.close()
        for w in writers:
            w.close()
        _copy_tokenizer(ckpt, tmp, getattr(plan.adapter, "tokenizer_overrides", None))
        cfg.save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; an engine is an ordinary directory
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def search_awq(ckpt, model_dir: str, quant, calib_file, calib_samples: int, calib_seq_len: int, progress: bool,
               clip: bool = True):
    from tp_runtime.convert import awq
    adapter = get_adapter(ckpt)
    fields = adapter.config()
    tensors = {ct.name: ct for ct in adapter.tensors(fields)}
    return awq.search(model_dir, tensors, fields, quant, calib_file, calib_samples, calib_seq_len, progress, clip)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


def _copy_tokenizer(ckpt, out_dir: str, overrides: dict | None = None) -> None:
    """Copy the tokenizer files in. `overrides` rewrites tokenizer_config.json keys (None deletes one):
    a family whose tokenizer is remote code gets a built-in class instead, so no .py is ever run."""
    import json

    if ckpt.gguf_file:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt.tokenizer_dir, gguf_file=ckpt.gguf_file)
        tok.save_pretrained(out_dir)
    else:
        for name in ef.TOKENIZER_FILES:
            src = os.path.join(ckpt.tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out_dir, name))
    tok_cfg = os.path.join(out_dir, "tokenizer_config.json")
    if overrides and os.path.isfile(tok_cfg):
        with open(tok_cfg) as f:
            data = json.load(f)
        for key, value in overrides.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        with open(tok_cfg, "w") as f:
            json.dump(data, f, indent=2)
    if ckpt.generation_config and not os.path.isfile(os.path.join(out_dir, "generation_config.json")):
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(ckpt.generation_config, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tp-convert",
        description="Shard a Hugging Face checkpoint into a tensor-parallel engine directory.",
    )
    p.add_argument("--model_dir", required=True,
                   help="Hugging Face model directory (safetensors, or pytorch_model*.bin read with "
                        "torch.load(weights_only=True)), or one .gguf file")
    p.add_argument("--output_dir", required=True,
                   help="engine directory to create (built in a temporary sibling, renamed at the end)")
    p.add_argument("--tp_size", type=int, default=1, help="number of tensor-parallel ranks (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="storage dtype of the engine; auto keeps the checkpoint's, float32 for a .gguf "
                        "(default %(default)s)")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="default run-time sequence limit (default min(max_position_embeddings, 4096))")
    p.add_argument("--max_batch_size", type=int, default=8,
                   help="default run-time batch limit (default %(default)s)")
    p.add_argument("--use_parallel_embedding", action="store_true",
                   help="split the embedding by vocab rows across ranks (all-reduced after the lookup) "
                        "instead of replicating it")
    q = p.add_argument_group("weight-only quantization (TensorRT-LLM's flags)")
    q.add_argument("--use_weight_only", action="store_true",
                   help="quantize the attention and MLP weights (activations stay in the engine dtype)")
    q.add_argument("--weight_only_precision", default=None, choices=list(qz.PRECISIONS),
                   help="int8 (per channel, W8A16) or int4 (per group, W4A16) (default int8)")
    q.add_argument("--group_size", type=int, default=None,
                   help="int4: inputs per scale, e.g. 32, 64, 128 (default 128), or -1 per channel; "
                        "int8 is per channel")
    q.add_argument("--zero_point", action="store_true",
                   help="asymmetric codes with a zero point per group (default: symmetric)")
    q.add_argument("--quant_algo", default="rtn",
                   help=f"one of {', '.join(qz.ALGOS)}: round to nearest, or AWQ's activation-aware scales "
                        "then round to nearest (int4 only) (default %(default)s)")
    q.add_argument("--quantize_lm_head", nargs="?", const="int8", default=None, choices=list(qz.PRECISIONS),
                   help="also quantize lm_head: int8 per channel (the default when given alone) or int4 (in "
                        "--group_size groups when the layers are int4, else 128)")
    q.add_argument("--calib_file", default=None,
                   help="awq: calibration text file (default: the documentation topics shipped with CPython)")
    q.add_argument("--calib_samples", type=int, default=None, help="awq: calibration samples (default 32)")
    q.add_argument("--calib_seq_len", type=int, default=None, help="awq: tokens per sample (default 256)")
    q.add_argument("--no_awq_clip", action="store_true",
                   help="awq: skip the weight clipping search that follows the scale search (on by default)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output directory (the old one stays if conversion fails)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def scheme_from_args(args) -> "qz.QuantScheme | None":
    quant_flags = (args.weight_only_precision, args.group_size, args.quantize_lm_head or None,
                   args.zero_point or None, None if args.quant_algo == "rtn" else args.quant_algo)
    if not args.use_weight_only:
        if any(f is not None for f in quant_flags):
            raise UserError("--weight_only_precision / --group_size / --zero_point / --quant_algo / "
                            "--quantize_lm_head need --use_weight_only")
        return None
    return qz.parse_scheme(args.weight_only_precision or "int8", args.group_size, args.zero_point,
                           args.quant_algo, args.quantize_lm_head)


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    quant = scheme_from_args(args)
    calib = (args.calib_file, args.calib_samples, args.calib_seq_len, args.no_awq_clip or None)
    if (quant is None or quant.algo != "awq") and any(c is not None for c in calib):
        raise UserError("--calib_file / --calib_samples / --calib_seq_len / --no_awq_clip are for --quant_algo awq")
    cfg = convert(args.model_dir, args.output_dir, args.tp_size, args.dtype, args.force,
                  args.max_seq_len, args.max_batch_size, progress=not args.no_progress,
                  parallel_embedding=args.use_parallel_embedding, quant=quant, calib_file=args.calib_file,
                  calib_samples=args.calib_samples or 32, calib_seq_len=args.calib_seq_len or 256,
                  awq_clip=not args.no_awq_clip)
    print(f"wrote {args.output_dir}: {cfg.source_architecture}, tp_size={cfg.tp_size}, dtype={cfg.dtype}, "
          f"heads per rank {cfg.heads_per_rank}, kv heads per rank {cfg.kv_heads_per_rank}"
          + (f", weights {cfg.quantization['quant_algo']}" if cfg.quantization.get("quant_algo") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
