"""tp-plan: how a model splits over tp ranks, and whether each rank's share fits its memory.

    tp-plan --config internlm2-20b --tp_size 2 --dtype bfloat16 --max_batch_size 4 --max_seq_len 4096 \\
            --memory_per_rank 24GiB

Runs the converter's own planning on meta tensors (no weights read or needed), so the weight bytes per
rank are exactly those of the rank files tp-convert would write. What a rank then holds once tp-run has
loaded it (runtime/footprint.py, the figures tp-run itself checks against the host's memory before it
loads): its weights as kept (float tensors in the compute dtype: a bf16 engine on a CPU without native
bf16 computes in float32 and keeps its float tensors so, quantized codes and scales as stored), the KV
cache (2 (k and v) x layers x batch x kv_heads_per_rank x seq x head_size x the compute dtype's size) and
the runtime's own share (Python, torch, the step's scratch). --compute_dtype auto is what tp-run would
pick on this machine's CPU.
"""

import argparse
import json
import sys

import torch

from tp_runtime.convert import partition as pt
from tp_runtime.convert import quantize as qz
from tp_runtime.convert.adapters import get_adapter
from tp_runtime.convert.checkpoint import Checkpoint
from tp_runtime.convert.plan import DTYPES, plan_engine
from tp_runtime.errors import UserError, exit_on_user_error
from tp_runtime.runtime import footprint
from tp_runtime.runtime.llm import pick_compute_dtype
from tp_runtime.convert.smoothquant import weight_only_modules
from tp_runtime.convert.synthetic import load_preset, source_shapes
from tp_runtime.memory import parse_size
from tp_runtime.runtime.kv_cache import DEFAULT_BLOCK_SIZE

GiB = 1 << 30


def parse_bytes(text: str) -> int:
    return parse_size(text, "--memory_per_rank")


def meta_checkpoint(cfg: dict) -> Checkpoint:
    dtype = DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype"), torch.bfloat16)
    tensors = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in source_shapes(cfg).items()}
    return Checkpoint(cfg, tensors, None, tokenizer_dir="")


def plan(cfg: dict, tp_size: int, dtype: str = "auto", precision: str | None = None, group_size: int | None = None,
         max_batch_size: int = 1, max_seq_len: int | None = None, memory_per_rank: int | None = None,
         parallel_embedding: bool = False, compute_dtype: str = "auto", block_size: int = DEFAULT_BLOCK_SIZE,
         kv_cache_memory: int | None = None, smoothquant: bool = False) -> dict:
    quant = None
    if precision is not None and smoothquant:
        raise UserError("--smoothquant plans W8A8 rank files; drop --weight_only_precision")
    if precision is not None:
        quant = qz.parse_scheme(precision, group_size if precision == "int4" else None)
    if smoothquant:  # per channel, static activation steps: the largest of the four variants by 4 bytes a linear
        fields = get_adapter(meta_checkpoint(cfg)).config()
        quant = qz.QuantScheme("int8", -1, algo="sq", sq_per_channel=True,
                               sq_weight_only=tuple(weight_only_modules(fields)[0]))
    if max_batch_size < 1 or block_size < 1 or (max_seq_len is not None and max_seq_len < 1):
        raise UserError("--max_batch_size, --block_size and --max_seq_len must be >= 1")
    ep = plan_engine(meta_checkpoint(cfg), tp_size, dtype, cfg.get("_name", "model"), max_seq_len, max_batch_size,
                     parallel_embedding, quant)
    ec = ep.config
    seq = ec.max_seq_len
    compute = DTYPES[compute_dtype] if compute_dtype != "auto" else pick_compute_dtype(ec.dtype, torch.device("cpu"))
    ranks = []
    blocks = footprint.kv_cache_blocks(ec, max_batch_size, seq, compute, block_size, kv_cache_memory)
    for r in range(tp_size):
        kept = footprint.weight_bytes(ep.specs[r], compute)
        kv = footprint.kv_cache_bytes(ec, r, max_batch_size, seq, compute, block_size, kv_cache_memory)
        total = kept + kv + footprint.RUNTIME_BYTES
        ranks.append({"rank": r, "heads": ec.heads_per_rank[r], "kv_heads": ec.kv_heads_per_rank[r],
                      "weight_bytes": ep.rank_bytes(r), "resident_weight_bytes": kept, "kv_cache_bytes": kv,
                      "runtime_bytes": footprint.RUNTIME_BYTES, "total_bytes": total,
                      "fits": None if memory_per_rank is None else total <= memory_per_rank})
    return {"architecture": ec.source_architecture, "tp_size": tp_size, "dtype": ec.dtype,
            "compute_dtype": str(compute).removeprefix("torch."),
            "weight_only_precision": precision, "max_batch_size": max_batch_size, "max_seq_len": seq,
            "block_size": block_size, "kv_cache_blocks": blocks, "kv_cache_tokens": (blocks - 1) * block_size,
            "num_attention_heads": ec.num_attention_heads, "num_key_value_heads": ec.num_key_value_heads,
            "valid_tp_sizes": pt.valid_tp_sizes(ec.num_attention_heads, ec.num_key_value_heads),
            "memory_per_rank": memory_per_rank, "ranks": ranks}


def render(report: dict) -> str:
    lines = [f"{report['architecture']}: {report['num_attention_heads']} heads / {report['num_key_value_heads']} KV "
             f"heads, tp_size {report['tp_size']}, {report['dtype']}"
             + (f" weights {report['weight_only_precision']}" if report["weight_only_precision"] else "")
             + f", computed in {report['compute_dtype']}"
             + f", KV cache of {report['kv_cache_tokens']} tokens ({report['kv_cache_blocks'] - 1} blocks of "
               f"{report['block_size']}: {report['kv_cache_tokens'] // report['max_seq_len']} sequences of "
               f"{report['max_seq_len']})", ""]
    mem = report["memory_per_rank"]
    head = "| rank | heads | KV heads | rank file GiB | weights kept GiB | KV cache GiB | runtime GiB | total GiB |"
    lines += [head + (f" fits {mem / GiB:.1f} GiB |" if mem else ""), "|---" * (9 if mem else 8) + "|"]
    for r in report["ranks"]:
        row = (f"| {r['rank']} | {r['heads']} | {r['kv_heads']} | {r['weight_bytes'] / GiB:.2f} | "
               f"{r['resident_weight_bytes'] / GiB:.2f} | {r['kv_cache_bytes'] / GiB:.2f} | "
               f"{r['runtime_bytes'] / GiB:.2f} | {r['total_bytes'] / GiB:.2f} |")
        lines.append(row + (f" {'yes' if r['fits'] else 'NO'} |" if mem else ""))
    lines += ["", "total: what a rank holds after tp-run has loaded it (tp-run refuses to load when its host's "
                  "ranks would not fit)",
              f"valid tp sizes for these heads: {', '.join(map(str, report['valid_tp_sizes']))}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tp-plan", description="Per-rank memory of a model split over tp ranks.")
    p.add_argument("--config", required=True, help="preset name (configs/NAME.json), a config .json or a model folder")
    p.add_argument("--tp_size", type=int, required=True, help="number of tensor-parallel ranks")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="engine dtype; auto: the config's torch_dtype, else bfloat16 (default %(default)s)")
    p.add_argument("--weight_only_precision", choices=["int8", "int4"], default=None,
                   help="plan weight-only quantized rank files (default: not quantized)")
    p.add_argument("--smoothquant", action="store_true",
                   help="plan SmoothQuant W8A8 rank files (int8 weights, static activation steps)")
    p.add_argument("--group_size", type=int, default=None,
                   help="int4 quantization group along the input dim (default 128; -1: per channel)")
    p.add_argument("--max_batch_size", type=int, default=1,
                   help="sequences of --max_seq_len the KV cache is sized for, without --kv_cache_memory "
                        "(default %(default)s)")
    p.add_argument("--kv_cache_memory", default=None, help="KV cache per rank, e.g. 4GiB, as tp-run's")
    p.add_argument("--block_size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="tokens per KV-cache block (default %(default)s)")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="tokens the KV cache is sized for (default min(max_position_embeddings, 4096))")
    p.add_argument("--memory_per_rank", default=None,
                   help="memory of one rank, e.g. 24GiB, 80GB; exit status 1 when a rank does not fit "
                        "(default: not checked)")
    p.add_argument("--use_parallel_embedding", action="store_true", help="as tp-convert's: split the embedding")
    p.add_argument("--compute_dtype", default="auto", choices=["auto", *DTYPES],
                   help="the dtype tp-run computes in (and keeps float weights and the KV cache in); auto: what "
                        "tp-run picks on this machine (a CPU without native bf16 computes a bf16 engine in float32) (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = load_preset(args.config)
    cfg.setdefault("_name", args.config)
    mem = parse_bytes(args.memory_per_rank) if args.memory_per_rank else None
    kv_mem = parse_size(args.kv_cache_memory, "--kv_cache_memory") if args.kv_cache_memory else None
    report = plan(cfg, args.tp_size, args.dtype, args.weight_only_precision, args.group_size,
                  args.max_batch_size, args.max_seq_len, mem, args.use_parallel_embedding, args.compute_dtype,
                  args.block_size, kv_mem, args.smoothquant)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0 if mem is None or all(r["fits"] for r in report["ranks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
