"""Our quantized engines, our fp32 engine and ONNX Runtime GenAI (int4 and fp32) in ONE process, taking turns.

bench_quant.py runs each configuration in a fresh process one after another; on a shared 2-core guest whose
speed drifts by +-20 % over minutes, a ratio of two such runs measures the drift as much as the engines. Here
every configuration is loaded once (tp=1 x 2 threads, compiled decode step, batch 1; and llama.cpp on the GGUF
through llama-cpp-python when it is installed), then each round runs
every one of them once (the same 128 prompt ids, 128 greedy new tokens, EOS ignored), so drift hits all
alike; per configuration the median decode tok/s over the rounds, and the issue's ratios (of the medians, and
the median of the rounds' own ratios)
(int8 / our fp32 >= 1.5x, int4 / ORT GenAI int4 >= 0.7x and >= 1.0x, fp32 / ORT GenAI fp32 >= 1.0x), with every
round's figures.

    .venv/bin/python benchmarks/bench_alternating.py [--rounds 7] [--new_tokens 128] [--configs LABEL ...]
        [--out benchmarks/results/alternating.json]
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
sys.path.insert(0, HERE)
import bench_cpu_tp  # noqa: E402  (its ORT GenAI generator)

CONFIGS = [  # label, quantize.parse_scheme arguments (None: fp32)[, --woq_kernel]
    ("fp32", None),
    ("int8 + int8 lm_head", dict(precision="int8", quantize_lm_head=True)),
    ("int4 g32 + int8 lm_head", dict(precision="int4", group_size=32, quantize_lm_head=True)),
    ("int4 g32 + int4 lm_head", dict(precision="int4", group_size=32, quantize_lm_head="int4")),
    ("int4 g64 + int8 lm_head", dict(precision="int4", group_size=64, quantize_lm_head=True)),
    ("int4 g32 + int4 lm_head, native_int4_q8", dict(precision="int4", group_size=32, quantize_lm_head="int4"),
     "native_int4_q8"),
]
ORT = "ONNX Runtime GenAI int4"
ORT_FP32 = "ONNX Runtime GenAI fp32"
LLAMA_CPP = "llama.cpp Q4_1 (the GGUF as shipped)"


def llama_cpp_runner(gguf: str, threads: int, ids: list, new: int):
    """llama-cpp-python on the project's GGUF (Q4_1 layers, Q8_0 embedding / head), greedy, EOS ignored."""
    from llama_cpp import Llama

    model = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + new + 8,
                  verbose=False)

    def once() -> float:
        stamps = []
        for _ in model.generate(ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == new:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    return once


def print_table(rounds: dict, kernels: dict, threads: int, prompt: int, new: int) -> None:
    """Per configuration the median tok/s and its ratios to our fp32 and ORT GenAI's: the ratio of the medians,
    and in brackets the median of each round's ratio (rounds are taken together, so drift cancels within one)."""
    med = {label: statistics.median(v) for label, v in rounds.items()}

    def ratio(label, ref):
        per_round = statistics.median(a / b for a, b in zip(rounds[label], rounds[ref]))
        return f"{med[label] / med[ref]:.2f}x ({per_round:.2f}x)"

    print(f"\nSmolLM2-135M-Instruct, tp=1 x {threads} threads, batch 1, {prompt} prompt ids, {new} new, greedy; "
          f"{len(next(iter(rounds.values())))} rounds taking turns in one process\n")
    print("| configuration | decode tok/s (median) | every round | kernels (auto unless named) | vs our fp32 | "
          "vs ORT GenAI fp32 | vs ORT GenAI int4 |")
    print("|---|---|---|---|---|---|---|")
    for label, v in rounds.items():
        print(f"| {label} | {med[label]:.1f} | {' '.join(f'{x:.0f}' for x in v)} | {', '.join(kernels.get(label, []))} "
              f"| {ratio(label, 'fp32')} | {ratio(label, ORT_FP32)} | {ratio(label, ORT)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=None, help="only these labels (fp32 and ORT always run)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from tp_runtime import LLM, SamplingParams
    from tp_runtime.convert import quantize as qz
    from tp_runtime.assets import fetch_smollm2_gguf, smollm2_hf_dir
    from tp_runtime.convert.pipeline import convert

    hf = smollm2_hf_dir()
    text = open(os.path.join(HERE, "bench_decode.py")).read()  # bench_quant's prompt: its first 128 tokens
    ids = AutoTokenizer.from_pretrained(hf)(text)["input_ids"][:128]
    work = tempfile.mkdtemp(prefix="bench_alternating-")
    runners, kernels = {}, {}
    try:
        for label, scheme, *kernel in CONFIGS:
            if args.configs and label not in args.configs and scheme is not None:
                continue
            print(f"[bench_alternating] load {label}", file=sys.stderr, flush=True)
            engine = os.path.join(work, f"e{len(runners)}")
            convert(hf, engine, 1, progress=False, quant=qz.parse_scheme(**scheme) if scheme else None)
            llm = LLM(engine, threads=args.threads, max_batch_size=1, max_seq_len=len(ids) + args.new_tokens + 1,
                      woq_kernel=kernel[0] if kernel else "auto")
            kernels[label] = sorted({m.woq.kernel_name for m in llm.model.modules()
                                     if getattr(m, "woq", None) is not None})

            def once(llm=llm) -> float:
                llm.generate([ids], SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
                return llm.last_timings.decode_tokens_per_s

            runners[label] = once
        for label, precision in ((ORT, "int4"), (ORT_FP32, "fp32")):
            print(f"[bench_alternating] build {label}", file=sys.stderr, flush=True)
            ort_dir = os.path.join(work, f"ort_{precision}")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", ort_dir,
                            "-p", precision, "-e", "cpu"], check=True, capture_output=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
            ort_once = bench_cpu_tp.ort_generator(ort_dir, args.threads, ids, args.new_tokens)
            runners[label] = lambda ort_once=ort_once: ort_once()[1]
        try:
            import llama_cpp  # noqa: F401  (built from source: pip install llama-cpp-python, ~10 min on 2 cores)
        except ImportError:
            print("[bench_alternating] llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
        else:
            runners[LLAMA_CPP] = llama_cpp_runner(fetch_smollm2_gguf(), args.threads, ids, args.new_tokens)
        for once in runners.values():  # warm-up
            once()
        rounds = {label: [] for label in runners}
        for r in range(args.rounds):
            for label, once in runners.items():
                rounds[label].append(once())
            print(f"[bench_alternating] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_table(rounds, kernels, args.threads, len(ids), args.new_tokens)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": rounds, "median": {label: statistics.median(v) for label, v in rounds.items()},
                       "kernels": kernels, "new_tokens": args.new_tokens,
                       "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
