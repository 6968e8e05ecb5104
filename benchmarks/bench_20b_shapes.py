"""20B-class models at their true widths, with the layer count cut: memory and decode speed, measured and
extrapolated to the full depth.

For each preset (default: internlm2-20b and gpt-neox-20b), a synthetic bf16 checkpoint with --num_layers
layers (random weights, the family's own layout) is converted at tp=1 and tp=2; then:
  * conversion peak RSS (VmHWM of a fresh process that converts);
  * per-rank RSS after load and a warm-up generation (VmRSS of each rank; mmap'd weights count once read);
  * decode ms per step (one prompt of 32 tokens, 32 new, median of 3 after a warm-up), the lm_head's own
    ms per call timed apart, and ms per layer = (step - head) / layers;
  * extrapolated to the preset's full depth (labelled so): weight bytes per rank from tp-plan on the full
    preset, and tokens/s per sequence = 1000 / (head + full_layers x ms per layer).

    .venv/bin/python benchmarks/bench_20b_shapes.py [--presets internlm2-20b gpt-neox-20b] [--num_layers 2]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker_convert(hf: str, engine: str, tp: int, out: str) -> None:
    from tp_runtime.convert.pipeline import convert

    t = time.perf_counter()
    convert(hf, engine, tp, progress=False)
    with open(out, "w") as f:
        json.dump({"peak_rss": vm("VmHWM"), "seconds": time.perf_counter() - t}, f)


def worker_run(engine: str, out: str) -> None:
    import torch

    from tp_runtime import LLM, SamplingParams

    llm = LLM(engine, max_seq_len=128, max_batch_size=1)
    prompt = list(range(100, 132))
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up: every weight page has now been read
    # RSS after load and one generation (mmap'd weights count once touched), every rank, in rank order
    rss = torch.tensor([vm("VmRSS")], dtype=torch.long)
    gathered = llm.comm.all_gather(rss, dim=0).tolist()
    steps = []
    for _ in range(3):
        llm.generate([prompt], params)
        if llm.rank == 0:  # timings are taken on rank 0
            steps.append(1000 / llm.last_timings.decode_tokens_per_s)
    x = torch.randn(1, llm.config.hidden_size, dtype=llm.dtype)
    with torch.inference_mode():
        for _ in range(3):
            llm.model.lm_head(x)
        t = time.perf_counter()
        for _ in range(20):
            llm.model.lm_head(x)
        head_ms = (time.perf_counter() - t) / 20 * 1000
    if llm.rank == 0:
        with open(out, "w") as f:
            json.dump({"rss_per_rank": gathered, "step_ms": statistics.median(steps), "head_ms": head_ms,
                       "dtype": str(llm.dtype).removeprefix("torch."), "threads": llm.threads}, f)
    llm.close()


def run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["internlm2-20b", "gpt-neox-20b"])
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--tp_sizes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from tp_runtime.cli.plan import plan
    from tp_runtime.convert.synthetic import load_preset, write_synthetic

    work = args.work or tempfile.mkdtemp(prefix="bench20b-")
    rows = []
    try:
        for name in args.presets:
            preset = load_preset(name)
            full_layers = preset.get("num_hidden_layers", preset.get("num_layers"))
            hf = os.path.join(work, f"{name}-hf")
            if not os.path.exists(hf):
                print(f"[bench_20b] synthesizing {name} with {args.num_layers} layers", file=sys.stderr)
                write_synthetic(preset, hf, args.num_layers, "bfloat16", progress=False)
            for tp in args.tp_sizes:
                engine = os.path.join(work, f"{name}-tp{tp}")
                shutil.rmtree(engine, ignore_errors=True)
                res_c = os.path.join(work, "convert.json")
                run([sys.executable, __file__, "--worker", "convert", hf, engine, str(tp), res_c])
                conv = json.load(open(res_c))
                res_r = os.path.join(work, "run.json")
                cmd = [sys.executable, __file__, "--worker", "run", engine, res_r]
                run(([os.path.join(BIN, "mpirun"), "-n", str(tp)] if tp > 1 else []) + cmd)
                r = json.load(open(res_r))
                per_layer = (r["step_ms"] - r["head_ms"]) / args.num_layers
                full = plan(preset, tp, "bfloat16", max_batch_size=1, max_seq_len=128)
                rows.append({
                    "preset": name, "tp": tp, "layers_run": args.num_layers, "dtype": r["dtype"],
                    "convert_peak_rss_mb": conv["peak_rss"] / 1e6, "convert_s": conv["seconds"],
                    "rss_after_load_mb": [x / 1e6 for x in r["rss_per_rank"]],
                    "step_ms": r["step_ms"], "head_ms": r["head_ms"], "ms_per_layer": per_layer,
                    "full_layers": full_layers,
                    "extrapolated_weights_gib_per_rank": [x["weight_bytes"] / (1 << 30) for x in full["ranks"]],
                    "extrapolated_tokens_per_s": 1000 / (r["head_ms"] + full_layers * per_layer),
                })
                shutil.rmtree(engine, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Synthetic bf16 checkpoints at true widths, {args.num_layers} layers; compute dtype as the runtime picks "
          "it on this CPU; 'extrapolated' columns scale to the preset's full depth\n")
    print("| preset | tp | convert peak RSS MB | RSS after load + warm-up MB per rank | decode ms/step | lm_head ms | ms/layer "
          "| extrapolated weights GiB/rank | extrapolated tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} ({r['dtype']}) | {r['tp']} | {r['convert_peak_rss_mb']:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in r['rss_after_load_mb'])} | {r['step_ms']:.1f} | {r['head_ms']:.1f} | "
              f"{r['ms_per_layer']:.1f} | {', '.join(f'{x:.1f}' for x in r['extrapolated_weights_gib_per_rank'])} | "
              f"{r['extrapolated_tokens_per_s']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "convert":
            worker_convert(rest[0], rest[1], int(rest[2]), rest[3])
        else:
            worker_run(rest[0], rest[1])
        sys.exit(0)
    sys.exit(main())
