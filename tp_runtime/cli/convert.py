"""tp-convert: the converter's command line (TensorRT-LLM's convert_checkpoint.py flags where one exists)."""

import argparse
import dataclasses
import sys

from tp_runtime.convert import quantize as qz
from tp_runtime.convert import smoothquant
from tp_runtime.convert.pipeline import convert
from tp_runtime.engine.format import DTYPES
from tp_runtime.errors import UserError, exit_on_user_error


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
                   help="quantize the attention and MLP weights (activations stay in the engine dtype); alone on "
                        "a .gguf, keep its Q8_0 / Q4_0 / Q4_1 blocks as they are (other types are rounded again)")
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
                   help="awq / smoothquant: calibration text file (default: the documentation topics shipped "
                        "with CPython)")
    q.add_argument("--calib_samples", type=int, default=None,
                   help="awq / smoothquant: calibration samples (default 32)")
    q.add_argument("--calib_seq_len", type=int, default=None,
                   help="awq / smoothquant: tokens per sample (default 256)")
    q.add_argument("--no_awq_clip", action="store_true",
                   help="awq: skip the weight clipping search that follows the scale search (on by default)")
    sq = p.add_argument_group("SmoothQuant W8A8 (TensorRT-LLM's flags; calibrated with --calib_*)")
    sq.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                    help="int8 weights and activations, activation outliers migrated into the weights with "
                         "strength ALPHA in [0, 1] (0.5 is usual)")
    sq.add_argument("--per_token", action="store_true",
                    help="smoothquant: one activation step per token at run time (default: one static step per "
                         "linear, calibrated)")
    sq.add_argument("--per_channel", action="store_true",
                    help="smoothquant: one weight step per output channel (default: one per linear)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output directory (the old one stays if conversion fails)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def scheme_from_args(args) -> "qz.QuantScheme | None":
    if args.smoothquant is not None:
        if args.use_weight_only:
            raise UserError("--smoothquant quantizes weights and activations (W8A8); it does not combine with "
                            "--use_weight_only (weights only): pick one")
        if args.quantize_lm_head or args.no_awq_clip or args.quant_algo != "rtn":
            raise UserError("--quantize_lm_head / --quant_algo / --no_awq_clip are weight-only flags; "
                            "--smoothquant leaves lm_head in the engine dtype")
        return qz.QuantScheme("int8", -1, algo="sq", sq_alpha=smoothquant.check_alpha(args.smoothquant),
                              sq_per_channel=args.per_channel, sq_per_token=args.per_token)
    if args.per_token or args.per_channel:
        raise UserError("--per_token / --per_channel are SmoothQuant's; they need --smoothquant ALPHA")
    quant_flags = (args.weight_only_precision, args.group_size, args.quantize_lm_head or None,
                   args.zero_point or None, None if args.quant_algo == "rtn" else args.quant_algo)
    if not args.use_weight_only:
        if any(f is not None for f in quant_flags):
            raise UserError("--weight_only_precision / --group_size / --zero_point / --quant_algo / "
                            "--quantize_lm_head need --use_weight_only")
        return None
    scheme = qz.parse_scheme(args.weight_only_precision or "int8", args.group_size, args.zero_point,
                             args.quant_algo, args.quantize_lm_head)
    # nothing but --use_weight_only (and --quantize_lm_head): a GGUF keeps its own block formats
    return dataclasses.replace(scheme, from_source=all(f is None for f in quant_flags[:2] + quant_flags[3:]))


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    quant = scheme_from_args(args)
    calib = (args.calib_file, args.calib_samples, args.calib_seq_len, args.no_awq_clip or None)
    if quant is not None and quant.algo == "sq":
        calib = calib[:3]
    if (quant is None or quant.algo not in ("awq", "sq")) and any(c is not None for c in calib):
        raise UserError("--calib_file / --calib_samples / --calib_seq_len / --no_awq_clip are for --quant_algo awq "
                        "(the --calib_* ones for --smoothquant too)")
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
