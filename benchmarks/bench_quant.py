"""Weight-only quantized engines of SmolLM2-135M-Instruct against our fp32 engine and ONNX Runtime GenAI int4.

tp=1 x 2 threads, batch 1, the same 128 prompt ids for everyone, greedy, 128 new tokens, EOS ignored; a fresh
process per configuration, one warm-up, median of 3 (bench_cpu_tp's protocol and its ORT GenAI worker):
    fp32 | int8 | int8 + int8 lm_head | int4 g64 (+ int8 lm_head) | int4 g32 (+ int8 lm_head) | int4 g64 AWQ
    | ORT GenAI int4 (its builder)
Per configuration: decode tok/s, TTFT, the bytes on disk of the quantized linears beside the same linears in
fp16, and the rank's RSS after the runs (KV cache sized for this one request); then the issue's ratios
(int8 / our fp32, int4 / ORT GenAI int4). The configurations run one after another: on a machine whose speed
drifts, read the ratios from bench_alternating.py, which takes turns in one process; this script is for sizes,
RSS and TTFT.

    .venv/bin/python benchmarks/bench_quant.py [--new_tokens 128] [--skip_ort] [--configs LABEL ...]
        [--out benchmarks/results/quant.json]
As on an AVX2-only CPU (tp_runtime's, torch's and oneDNN's kernels capped to AVX2; ORT GenAI keeps its own
dispatch): TP_RUNTIME_ISA=avx2 .venv/bin/python benchmarks/bench_quant.py --out benchmarks/results/quant_avx2.json
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tp_runtime import cpu  # noqa: E402
import bench_cpu_tp  # noqa: E402  (its ORT GenAI worker, engine_bytes and run_worker)

LINEAR = re.compile(r"\.(attention\.(qkv|dense)|mlp\.(fc|gate|proj))\.|^lm_head\.")

CONFIGS = [  # label, quantize.parse_scheme arguments (tp-convert's flags)[, --woq_kernel]
    ("fp32", None),
    ("int8", dict(precision="int8")),
    ("int8 + int8 lm_head", dict(precision="int8", quantize_lm_head=True)),
    ("int8, fbgemm_int8", dict(precision="int8"), "fbgemm_int8"),
    ("int8 + int8 lm_head, fbgemm_int8", dict(precision="int8", quantize_lm_head=True), "fbgemm_int8"),
    ("int4 g64", dict(precision="int4", group_size=64)),
    ("int4 g64 + int8 lm_head", dict(precision="int4", group_size=64, quantize_lm_head=True)),
    ("int4 g32", dict(precision="int4", group_size=32)),
    ("int4 g32 + int8 lm_head", dict(precision="int4", group_size=32, quantize_lm_head=True)),
    ("int4 g32 + int4 lm_head", dict(precision="int4", group_size=32, quantize_lm_head="int4")),
    ("int4 g64 AWQ", dict(precision="int4", group_size=64, algo="awq")),
    # tp_runtime's AVX2 kernels forced (what `auto` picks on an AVX2-only CPU, where torch's are 15-60x slower)
    ("int8 + int8 lm_head, native_int8", dict(precision="int8", quantize_lm_head=True), "native_int8"),
    ("int4 g64 + int8 lm_head, native_int4", dict(precision="int4", group_size=64, quantize_lm_head=True),
     "native_int4"),
    # activations rounded to int8 per 32 inputs in decode steps (one part), as ONNX Runtime GenAI's CPU int4 does
    ("int4 g32 + int8 lm_head, native_int4_q8", dict(precision="int4", group_size=32, quantize_lm_head=True),
     "native_int4_q8"),
]


def worker(engine: str, threads: int, ids: list, new: int, out: str, kernel: str = "auto") -> None:
    from tp_runtime import LLM

    # KV cache for this one request only, so RSS shows the weights (the default 8 x 4096 cache is 1.5 GB)
    llm = LLM(engine, threads=threads, max_batch_size=1, max_seq_len=len(ids) + new + 1,
              woq_kernel=kernel)
    medians = bench_cpu_tp.llm_medians(llm, ids, new)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    kernels = sorted({m.woq.kernel_name for m in llm.model.modules() if getattr(m, "woq", None) is not None})
    with open(out, "w") as f:
        json.dump({**medians, "rss_mb": int(status["VmRSS"].split()[0]) / 1024, "kernels": kernels}, f)
    llm.close()


def linear_bytes(engine: str) -> tuple[int, int]:
    """(bytes on disk of the attention / MLP / lm_head tensors, the same linears' weights in fp16)."""
    from tp_runtime.engine import format as ef
    header, _ = ef.read_safetensors_header(os.path.join(engine, ef.rank_file(0)))
    cfg = ef.EngineConfig.load(engine)
    on_disk = fp16 = 0
    for name, meta in header.items():
        if name == "__metadata__" or not LINEAR.search(name):
            continue
        on_disk += meta["data_offsets"][1] - meta["data_offsets"][0]
        if name.endswith(".weight"):
            rows, cols = meta["shape"]
            int4 = cfg.quantization.get("weight_only_precision") == "int4"
            if meta["dtype"] == "U8" and "lm_head" not in name and int4:
                cols *= 2  # two int4 codes a byte
            fp16 += rows * cols * 2
    return on_disk, fp16


def machine() -> dict:
    """The CPU and the instruction sets torch was allowed (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA=AVX2 make
    an AVX-512 machine run torch's AVX2 code, as on the Zen 3 of the issues; ORT GenAI is not restricted)."""
    import torch

    return {"cpu": cpu.model_name(), "cpu_flags": cpu.tag(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf_dir", default=None, help="default: SmolLM2-135M-Instruct from tp_runtime.assets")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip_ort", action="store_true")
    p.add_argument("--configs", nargs="+", default=None,
                   help="run only these configurations (labels as in the table; ORT GenAI unless --skip_ort)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "quant.json"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    from tp_runtime.convert import quantize as qz
    from tp_runtime.assets import smollm2_hf_dir
    from tp_runtime.convert.pipeline import convert

    hf = args.hf_dir or smollm2_hf_dir()
    text = open(os.path.join(HERE, "bench_decode.py")).read()
    ids = AutoTokenizer.from_pretrained(hf)(text)["input_ids"][:128]
    work = tempfile.mkdtemp(prefix="bench_quant-")
    rows = []
    try:
        for label, flags, *kernel in CONFIGS:
            if args.configs and label not in args.configs:
                continue
            engine = os.path.join(work, re.sub(r"\W+", "_", label))
            quant = qz.parse_scheme(**flags) if flags else None
            t0 = time.perf_counter()
            convert(hf, engine, 1, progress=False, quant=quant)
            convert_s = time.perf_counter() - t0
            print(f"[bench_quant] {label}", file=sys.stderr, flush=True)
            out = tempfile.mktemp(suffix=".json")
            res = subprocess.run([sys.executable, __file__, "--worker",
                                  json.dumps([engine, args.threads, ids, args.new_tokens, out, *kernel])],
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"failed: {label}\n{res.stderr[-3000:]}")
            with open(out) as f:
                r = json.load(f)
            os.unlink(out)
            on_disk, fp16 = linear_bytes(engine)
            rows.append({"config": label, **r, "convert_s": convert_s,
                         "engine_bytes": bench_cpu_tp.engine_bytes(engine),
                         "linear_bytes": on_disk, "linear_fp16_bytes": fp16})
            shutil.rmtree(engine)
        if not args.skip_ort:
            out_dir = os.path.join(work, "ort_int4")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out_dir,
                            "-p", "int4", "-e", "cpu"], check=True, capture_output=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
            print("[bench_quant] ONNX Runtime GenAI int4", file=sys.stderr, flush=True)
            r = bench_cpu_tp.run_worker(["ort", out_dir, args.threads, ids, args.new_tokens])
            size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)
                       if f.startswith("model.onnx"))
            rows.append({"config": "ONNX Runtime GenAI int4", **r, "engine_bytes": size})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{machine()}")
    print(f"SmolLM2-135M-Instruct, tp=1 x {args.threads} threads, batch 1, 128 prompt ids, {args.new_tokens} new, "
          "greedy\n")
    print("| configuration | decode tok/s | TTFT ms | linears on disk MB | vs fp16 | engine MB | RSS MB | convert s "
          "| kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lin = " | "
        if "linear_bytes" in r:
            lin = f"{r['linear_bytes'] / 1e6:.1f} | {r['linear_bytes'] / r['linear_fp16_bytes']:.2f}"
        rss = f"{r['rss_mb']:.0f}" if "rss_mb" in r else ""
        conv = f"{r['convert_s']:.0f}" if "convert_s" in r else ""
        print(f"| {r['config']} | {r['decode_tok_s']:.1f} | {r['ttft_ms']:.0f} | {lin} | "
              f"{r['engine_bytes'] / 1e6:.0f} | {rss} | {conv} | {', '.join(r.get('kernels', []))} |")
    by = {r["config"]: r for r in rows}
    print()
    if "fp32" in by:
        for label in [c for c, *_ in CONFIGS if c.startswith("int8") and c in by]:
            print(f"{label} / our fp32 decode: {by[label]['decode_tok_s'] / by['fp32']['decode_tok_s']:.2f}x "
                  "(goal >= 1.5x)")
    if "ONNX Runtime GenAI int4" in by:
        ort = by["ONNX Runtime GenAI int4"]["decode_tok_s"]
        for label in [c for c, *_ in CONFIGS if c.startswith("int4") and c in by]:
            print(f"{label} / ORT GenAI int4 decode: {by[label]['decode_tok_s'] / ort:.2f}x (goal >= 0.7x)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "new_tokens": args.new_tokens, "machine": machine(), "rows": rows}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(*json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
