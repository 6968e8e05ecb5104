"""Peak memory of tp-convert against the size of the largest tensor it has to handle.

tp-convert claims to hold one canonical tensor (plus one rank's slice of it) at a time, so its peak RSS
should stay near twice the largest tensor whatever the size of the checkpoint. This script checks that:

  1. It writes a synthetic LlamaForCausalLM checkpoint of several GB (default: Llama-2-7B-like layers,
     hidden 4096, intermediate 11008, 32 heads, 8 KV heads, vocab 32000, untied lm_head, as many layers as
     fit --size_gb). The tensors are streamed to disk one at a time with tp_runtime's streaming safetensors
     writer, in shards of about --shard_gb with a model.safetensors.index.json, like a real download; each
     tensor is filled with seeded random numbers just before it is written, so this process never holds
     more than one tensor either.
  2. It runs the conversion (--tp_size 2 by default) in a fresh child process: the child imports
     tp_runtime.cli.convert, records VmRSS (the baseline after imports), runs exactly what the tp-convert
     console script runs (convert.main with the same flags), then reads VmHWM (the kernel's peak resident
     set size of that process) from /proc/self/status.
  3. It reports checkpoint size, largest tensor, baseline and peak RSS, the bound 2 x largest + 300 MB
     and PASS / FAIL of peak <= bound, and deletes the checkpoint and the engine (unless --keep).

    .venv/bin/python benchmarks/bench_convert_memory.py --out results/convert_memory.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MB = 1 << 20
DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}


def llama_specs(layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int) -> list:
    """(name, shape) of every tensor of a LlamaForCausalLM with an untied lm_head, in file order."""
    head_dim = hidden // heads
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(folder: str, specs: list, dtype_name: str, shard_bytes: int, config: dict) -> None:
    """Shards of about shard_bytes, written tensor by tensor, plus config.json and the index."""
    import torch

    from tp_runtime.convert.writer import StreamingSafetensorsWriter

    dtype = getattr(torch, dtype_name)
    size = DTYPE_SIZES[dtype_name]
    shards, current, used = [], [], 0
    for name, shape in specs:
        nbytes = numel(shape) * size
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, shape))
        used += nbytes
    shards.append(current)

    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = StreamingSafetensorsWriter(os.path.join(folder, fname), [(n, dtype, s) for n, s in shard],
                                            {"format": "pt"})
        for name, shape in shard:
            if len(shape) == 1:  # RMSNorm weights
                t = torch.ones(shape, dtype=dtype)
            else:
                t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)
            writer.write(name, t)
            weight_map[name] = fname
            del t
        writer.close()
        print(f"[bench_convert_memory] wrote {fname}", file=sys.stderr, flush=True)
    total = sum(numel(s) for _, s in specs) * size
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def proc_status(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child_main(model_dir: str, output_dir: str, tp: int, result_path: str) -> int:
    from tp_runtime.cli import convert
    baseline = proc_status("VmRSS")
    t0 = time.perf_counter()
    rc = convert.main(["--model_dir", model_dir, "--output_dir", output_dir, "--tp_size", str(tp),
                       "--no_progress"])
    seconds = time.perf_counter() - t0
    with open(result_path, "w") as f:
        json.dump({"rc": rc, "baseline_rss": baseline, "peak_rss": proc_status("VmHWM"), "convert_s": seconds}, f)
    return rc or 0


def du(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size_gb", type=float, default=3.0, help="approximate checkpoint size (default 3)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: as many as fit --size_gb)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_SIZES))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tp_size", type=int, default=2)
    p.add_argument("--shard_gb", type=float, default=2.0, help="checkpoint shard size (default 2)")
    p.add_argument("--slack_mb", type=float, default=300.0, help="bound = 2 x largest tensor + this (default 300)")
    p.add_argument("--work", default=None, help="folder for the checkpoint and the engine (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the engine")
    p.add_argument("--out", default=None, help="JSON file for the raw results")
    p.add_argument("--child", nargs=4, metavar=("MODEL", "OUT", "TP", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        m, o, tp, r = args.child
        return child_main(m, o, int(tp), r)

    size = DTYPE_SIZES[args.dtype]
    layers = args.layers
    if layers is None:
        outer = llama_specs(0, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
        one = llama_specs(1, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
        fixed = sum(numel(s) for _, s in outer) * size
        per_layer = sum(numel(s) for _, s in one) * size - fixed
        layers = max(1, round((args.size_gb * (1 << 30) - fixed) / per_layer))
    specs = llama_specs(layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    ckpt_bytes = sum(numel(s) for _, s in specs) * size
    largest_name, largest_shape = max(specs, key=lambda ns: numel(ns[1]))
    largest = numel(largest_shape) * size

    work = args.work or tempfile.mkdtemp(prefix="bench_convert_memory-")
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 3 * ckpt_bytes:
        print(f"refusing: {work} has {free / MB:.0f} MB free, less than 3 x the checkpoint "
              f"({ckpt_bytes / MB:.0f} MB); pass --work on a bigger disk or lower --size_gb", file=sys.stderr)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        return 2

    model_dir, engine_dir = os.path.join(work, "synthetic-llama"), os.path.join(work, "engine")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "intermediate_size": args.intermediate, "num_attention_heads": args.heads,
              "num_key_value_heads": args.kv_heads, "num_hidden_layers": layers, "vocab_size": args.vocab,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": args.dtype,
              "bos_token_id": 1, "eos_token_id": 2}
    try:
        os.makedirs(model_dir, exist_ok=True)
        print(f"[bench_convert_memory] writing {layers} layers, {ckpt_bytes / MB:.0f} MB {args.dtype} to {model_dir}",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        write_checkpoint(model_dir, specs, args.dtype, int(args.shard_gb * (1 << 30)), config)
        write_s = time.perf_counter() - t0
        result_path = os.path.join(work, "child.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", model_dir, engine_dir, str(args.tp_size),
               result_path]
        print(f"[bench_convert_memory] {' '.join(cmd)}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        with open(result_path) as f:
            child = json.load(f)
        engine_bytes = du(engine_dir)
    finally:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(engine_dir, ignore_errors=True)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)

    bound = 2 * largest + args.slack_mb * MB
    ok = child["peak_rss"] <= bound
    print(f"tp-convert --tp_size {args.tp_size} of a synthetic LlamaForCausalLM ({layers} layers, hidden "
          f"{args.hidden}, intermediate {args.intermediate}, {args.heads} heads / {args.kv_heads} KV, vocab "
          f"{args.vocab}, {args.dtype})\n")
    print("| checkpoint MB | largest tensor MB | baseline RSS MB | peak RSS MB | bound MB | result | convert s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {ckpt_bytes / MB:.0f} | {largest / MB:.0f} ({largest_name}) | {child['baseline_rss'] / MB:.0f} | "
          f"{child['peak_rss'] / MB:.0f} | {bound / MB:.0f} | {'PASS' if ok else 'FAIL'} | {child['convert_s']:.1f} |")
    print(f"\nbound = 2 x largest tensor + {args.slack_mb:.0f} MB; baseline = RSS after importing tp_runtime.cli.convert; "
          f"engine on disk {engine_bytes / MB:.0f} MB")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": config, "tp_size": args.tp_size, "checkpoint_bytes": ckpt_bytes,
                       "largest_tensor": largest_name, "largest_tensor_bytes": largest, "bound_bytes": bound,
                       "pass": ok, "write_s": write_s, "engine_bytes": engine_bytes, **child}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
