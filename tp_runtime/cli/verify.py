"""tp-verify: an engine against its Hugging Face checkpoint, layer by layer, in bounded memory.

    tp-verify --engine ENGINE --model_dir HF [--prompt TEXT | --input_ids 1,2,3 ...] [--layers all|0,5,47]
              [--rtol R] [--min_cos C] [--atol A]
    mpirun -n 2 tp-verify --engine ENGINE_TP2 --model_dir HF       # or alone: it starts the tp_size ranks itself

The same tokens go to the engine and to a float32 reference that holds one layer of the checkpoint at a time
(convert/layer_reference.py: transformers' own decoder layer where transformers ships the family, the canonical
reference forward for remote-code families). Layer i of the engine gets the reference's hidden state entering
layer i, so errors do not compound; each layer is checked in two halves on the same inputs:

    attention  h = x + attention(norm(x))        engine's attention half on the reference's x
    MLP        out = h + mlp(norm(h))            engine's MLP half on the reference's h (x for a parallel residual)

and the final logits are compared end to end (the engine's own forward from the token ids). Per half it prints
the max abs error of the hidden state, its relative error (||engine - ref|| / ||ref||) and cosine similarity,
and the same two for the half's own output (the branch added to the residual, `out_rel`, `out_cos`), which the
residual stream cannot dilute: the limits are held against those. Exit status 0 when every half and the logits
pass, 1 otherwise (the first layer past the limits and its half, attention or MLP, are named), 2 on a user error.

Default limits, set from tiny random checkpoints of every family at tp 1 (worst half of any layer, and the logits):
    float32 engines              out_rel <= 1e-4                   (measured out_rel <= 5e-7)
    bfloat16 / float16 engines   out_rel <= 0.1,  out_cos >= 0.995  (measured <= 0.04, >= 0.998)
    int8 weight-only (W8A16)     out_rel <= 0.1,  out_cos >= 0.999  (measured <= 0.024, >= 0.9995)
    int4 weight-only (W4A16*)    out_rel <= 0.4,  out_cos >= 0.95   (measured, g32 to g128: <= 0.2, >= 0.98)
The logits, end to end, are held to the same limits but int4's: rel <= 0.6, cos >= 0.9 (measured <= 0.31, >= 0.954).
The cosine judges direction, the relative error scale (a tensor scaled by a constant keeps its cosine).
--rtol, --min_cos and --atol (max abs error of the hidden state) replace them; a half passes when every limit
set holds. Memory: the engine, plus one float32 layer of the checkpoint and the activations (rank 0 alone runs
the reference and hands each layer's inputs to the other ranks, which wait for it up to --reference_timeout).
"""

import argparse
import math
import sys

import torch

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError, exit_on_user_error
from tp_runtime.cli.run import add_runtime_args, options_from_args

LAUNCHERS = ("auto", "local", "mpirun", "torchrun")
DEFAULT_ROWS, DEFAULT_TOKENS = 2, 16  # the default prompt: fixed random ids, a different one per row
# (rtol, min_cos) by engine precision; see the module docstring
LIMITS = {"float32": (1e-4, None), "half": (0.1, 0.995), "int8": (0.1, 0.999), "int4": (0.4, 0.95)}
# the logits carry every layer's error: int4's compound past the per-half limits (EXAONE-4: 0.31 / 0.954 measured)
LOGIT_LIMITS = {**LIMITS, "int4": (0.6, 0.9)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tp-verify", description="Check an engine against its Hugging Face checkpoint, "
                                "layer by layer; exit 0 when every layer is within the limits, 1 otherwise.",
                                epilog="default limits of each half's output: float32 engines out_rel <= 1e-4; "
                                "bfloat16/float16 out_rel <= 0.1 and out_cos >= 0.995; int8 out_rel <= 0.1 and "
                                "out_cos >= 0.999; int4 out_rel <= 0.4 and out_cos >= 0.95 (its logits: 0.6 and 0.9)")
    p.add_argument("--engine", "--engine_dir", dest="engine", required=True, help="engine directory")
    p.add_argument("--model_dir", required=True, help="the Hugging Face checkpoint the engine was converted from")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="text, tokenized with the engine's tokenizer (no chat template)")
    src.add_argument("--input_ids", nargs="+", default=None,
                     help='token ids, one string per batch row, e.g. "1,2,3" "4,5,6" (rows of equal length); '
                          f"default: {DEFAULT_ROWS} rows of {DEFAULT_TOKENS} fixed random ids")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer for --prompt (default: the engine's)")
    p.add_argument("--layers", default="all", help='layers to compare: "all" or indices, e.g. 0,5,47 '
                   "(the reference still runs every layer for the logits) (default %(default)s)")
    p.add_argument("--rtol", type=float, default=None,
                   help="most relative error of each half's output (default: by engine precision, see below)")
    p.add_argument("--min_cos", type=float, default=None,
                   help="least cosine similarity of each half's output (default: by engine precision)")
    p.add_argument("--atol", type=float, default=None, help="most abs error of any hidden-state value (default: none)")
    p.add_argument("--reference_timeout", type=float, default=600.0,
                   help="seconds the other ranks wait while rank 0 runs a reference layer (default %(default)s)")
    p.add_argument("--launcher", default="auto", choices=LAUNCHERS,
                   help="who starts the ranks: auto = the launcher that started this process, else local when the "
                        "engine's tp_size > 1; local: tp_size rank processes started here; mpirun / torchrun: expect "
                        "to be started by them (default %(default)s)")
    add_runtime_args(p)
    return p


def parse_layers(text: str, num_layers: int) -> list[int]:
    if text.strip() == "all":
        return list(range(num_layers))
    try:
        layers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UserError(f'--layers takes "all" or comma-separated layer indices, e.g. 0,5,47; got {text!r}') from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise UserError(f"--layers {text!r}: the model has layers 0..{num_layers - 1}"
                        + (f"; {bad} are outside" if bad else ""))
    return layers


def read_ids(args, cfg: ef.EngineConfig) -> torch.Tensor:
    """The token ids (B, T) every rank feeds both sides."""
    if args.input_ids is not None:
        try:
            rows = [[int(t) for t in s.replace(" ", "").split(",") if t] for s in args.input_ids]
        except ValueError:
            raise UserError('--input_ids takes comma-separated integers, e.g. --input_ids "1,2,3" "4,5,6"') from None
    elif args.prompt is not None:
        from transformers import AutoTokenizer

        path = args.tokenizer_dir or args.engine
        try:
            rows = [list(AutoTokenizer.from_pretrained(path)(args.prompt)["input_ids"])]
        except (OSError, ValueError) as e:
            raise UserError(f"no usable tokenizer in {path} ({e}); pass --tokenizer_dir, or give --input_ids") from None
    else:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, cfg.vocab_size, (DEFAULT_ROWS, min(DEFAULT_TOKENS, cfg.max_seq_len)), generator=g)
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise UserError("--input_ids rows must be non-empty and of equal length")
    bad = [t for r in rows for t in r if not 0 <= t < cfg.vocab_size]
    if bad:
        raise UserError(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    return torch.tensor(rows)


def check_same_model(cfg: ef.EngineConfig, fields: dict, engine: str, model_dir: str) -> None:
    """The engine and the checkpoint describe the same model, or a UserError naming what differs."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_size",
            "intermediate_size", "vocab_size", "norm_placement", "parallel_residual", "gated_mlp")
    diff = [f"{k} {getattr(cfg, k)} vs {fields[k]}" for k in keys if k in fields and getattr(cfg, k) != fields[k]]
    if fields.get("source_architecture", cfg.source_architecture) != cfg.source_architecture:
        diff.insert(0, f"architecture {cfg.source_architecture} vs {fields['source_architecture']}")
    if diff:
        raise UserError(f"the engine {engine} was not converted from {model_dir} (engine vs checkpoint: "
                        f"{', '.join(diff)})")


def precision(cfg: ef.EngineConfig) -> str:
    """The engine's key in LIMITS: int4 / int8 weight-only, else its storage dtype."""
    algo = (cfg.quantization or {}).get("quant_algo") or ""
    return "int4" if algo.startswith("W4") else "int8" if algo else "float32" if cfg.dtype == "float32" else "half"


def metrics(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor | None) -> dict:
    """Errors of a hidden state (got vs want) and of the branch it adds to base (got - base vs want - base)."""
    got, want = got.double().flatten(), want.double().flatten()
    err = got - want
    m = {"max_abs": err.abs().max().item(), "rel": (err.norm() / want.norm().clamp_min(1e-30)).item(),
         "cos": torch.nn.functional.cosine_similarity(got, want, dim=0).item()}
    if base is not None:
        base = base.double().flatten()
        branch = want - base
        m["out_rel"] = (err.norm() / branch.norm().clamp_min(1e-30)).item()
        m["out_cos"] = torch.nn.functional.cosine_similarity(got - base, branch, dim=0).item()
    else:  # the logits: no residual to take away
        m["out_rel"], m["out_cos"] = m["rel"], m["cos"]
    return m


def within(m: dict, rtol, min_cos, atol) -> bool:
    ok = all(math.isfinite(v) for v in m.values())
    if rtol is not None:
        ok = ok and m["out_rel"] <= rtol
    if min_cos is not None:
        ok = ok and m["out_cos"] >= min_cos
    if atol is not None:
        ok = ok and m["max_abs"] <= atol
    return ok


def row(name: str, half: str, m: dict, ok: bool) -> str:
    return (f"{name:>6} {half:<9} {m['max_abs']:10.3e} {m['rel']:10.3e} {m['cos']:10.6f} {m['out_rel']:10.3e} "
            f"{m['out_cos']:10.6f}  {'ok' if ok else 'FAIL'}")


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from tp_runtime.distributed.launch import detect_launch

    cfg = ef.EngineConfig.load(args.engine)
    ranks = args.tp_size or cfg.tp_size  # --tp_size: the engine re-sliced at load
    if detect_launch().launcher == "none" and ranks > 1:
        if args.launcher in ("mpirun", "torchrun"):
            raise UserError(f"--launcher {args.launcher}: start tp-verify under it, e.g. "
                            + (f"mpirun -n {ranks} tp-verify ..." if args.launcher == "mpirun"
                               else f"torchrun --nproc_per_node {ranks} $(which tp-verify) ..."))
        from tp_runtime.distributed.local_launch import launch_local

        print(f"[tp-verify] starting {ranks} local ranks", file=sys.stderr, flush=True)
        return launch_local(ranks, [sys.executable, "-m", "tp_runtime.cli.verify", *argv])
    return verify_rank(args, cfg)


def verify_rank(args, cfg: ef.EngineConfig) -> int:
    from tp_runtime.convert.layer_reference import LayerReference
    from tp_runtime.runtime.llm import LLM

    if args.reference_timeout <= 0:
        raise UserError(f"--reference_timeout must be > 0, got {args.reference_timeout}")
    ref = LayerReference(args.model_dir)  # every rank: opening is cheap, and a mismatch fails on every rank alike
    check_same_model(cfg, ref.fields, args.engine, args.model_dir)
    layers = parse_layers(args.layers, cfg.num_hidden_layers)
    ids = read_ids(args, cfg)
    B, T = ids.shape
    kind = precision(cfg)
    rtol, min_cos = (given if given is not None else default
                     for given, default in zip((args.rtol, args.min_cos), LIMITS[kind], strict=True))
    logits_rtol, logits_min_cos = (given if given is not None else default
                                   for given, default in zip((args.rtol, args.min_cos), LOGIT_LIMITS[kind], strict=True))
    llm = LLM(args.engine, options_from_args(args, compile="off", max_batch_size=B, max_seq_len=max(T, 2)))
    lead, comm, model = llm.rank == 0, llm.comm, llm.model
    if lead:
        limits = ", ".join(s for s in (f"out_rel <= {rtol:g}" if rtol is not None else "",
                                       f"out_cos >= {min_cos:g}" if min_cos is not None else "",
                                       f"max_abs <= {args.atol:g}" if args.atol is not None else "") if s)
        print(f"[tp-verify] {cfg.source_architecture} engine {args.engine} ({kind}, tp_size {llm.config.tp_size}, "
              f"compute "
              f"{str(llm.dtype).removeprefix('torch.')}) against {args.model_dir} ({ref.source})", flush=True)
        print(f"[tp-verify] {B} x {T} tokens; limits: {limits or 'none'}", flush=True)
        print(f"{'layer':>6} {'half':<9} {'max_abs':>10} {'rel':>10} {'cos':>10} {'out_rel':>10} {'out_cos':>10}",
              flush=True)
    dev = llm.device
    positions = torch.arange(T).expand(B, T).to(dev)
    blocks, offsets, tables, masks, cos, sin = model.layer_inputs(ids.to(dev), positions, llm.cache)
    wanted, failures = set(layers), []
    x = ref.embed(ids) if lead else None
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            if lead:
                h, out = ref.layer(i, x)
            if i in wanted:
                if comm.world_size > 1:  # the other ranks wait for rank 0's reference layer, then get its inputs
                    comm.barrier(timeout_s=args.reference_timeout)
                    x, h = comm.broadcast_object((x, h) if lead else None)
                layer = model.layers[i]
                xe, he = x.to(dev, llm.dtype), h.to(dev, llm.dtype)
                h_engine = layer.attention_half(xe, cos, sin, llm.cache.k[i], llm.cache.v[i], blocks, offsets,
                                                tables, masks)
                out_engine = layer.mlp_half(xe, he)
                if lead:
                    for half, got, want, base in (("attention", h_engine, h, x), ("MLP", out_engine, out, h)):
                        m = metrics(got.float().cpu(), want, base)
                        ok = within(m, rtol, min_cos, args.atol)
                        print(row(str(i), half, m, ok), flush=True)
                        if not ok:
                            failures.append(f"layer {i} {half}")
            if lead:
                x = out
        logits = model(ids.to(dev), positions, llm.cache)  # (B, T, vocab), the engine's own forward end to end
        if lead:
            m = metrics(logits.float().cpu(), ref.logits(x), None)
            ok = within(m, logits_rtol, logits_min_cos, None)
            print(row("", "logits", m, ok), flush=True)
            if not ok:
                failures.append("the final logits (embedding, final norm or lm_head, or errors compounded "
                                "over the layers)")
    if lead:
        if failures:
            print(f"[tp-verify] FAIL: {failures[0]} is past the limits"
                  + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""), flush=True)
        else:
            print(f"[tp-verify] PASS: {len(layers)} layer(s) and the logits within the limits", flush=True)
    status = comm.broadcast_object(1 if failures else 0 if lead else None)
    llm.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
