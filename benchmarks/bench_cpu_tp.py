"""CPU tensor parallelism against one process and against ONNX Runtime GenAI, with the machine's roofline.

SmolLM2-135M-Instruct (or --hf_dir, or --model llama-1b: the 1B-class random-weight Llama of configs/
llama-1b-bench.json, fp32), batch 1, the same 128 prompt ids for everyone, greedy, 128 new tokens,
EOS ignored; a fresh process per configuration, one warm-up, median of 3 (--rounds R: every configuration R
times, taking turns, medians over the rounds):
    tp_runtime tp=1 x 2 threads, tp=1 x 1 thread, tp=2 x 1 thread over shared memory, tp=2 x 1 thread over gloo,
        each with the compiled decode step (--compile on), and tp=1 x 2 / tp=2 x 1 shm with the eager step
    ONNX Runtime GenAI fp32 and int4 (built here with its own builder, 2 threads; SmolLM2 only), transformers
Roofline: the bytes of weights one decode step reads (the engine's rank files) over the read bandwidth of
this machine (torch sum over 2 GiB, 2 threads); each result is given as a fraction of that ceiling.
Prints a table and draws benchmarks/results/cpu_tp.png. Needs the `bench` extra (pip install -e '.[bench]').

    .venv/bin/python benchmarks/bench_cpu_tp.py [--new_tokens 128] [--rounds 1] [--only SUBSTR,...]
        [--out benchmarks/results/cpu_tp.json]
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


def write_medians(once, out: str) -> None:
    """One warm-up, then the median (ttft_ms, decode_tok_s) of 3 runs of once() to `out`."""
    once()
    runs = [once() for _ in range(3)]
    with open(out, "w") as f:
        json.dump({"ttft_ms": statistics.median(r[0] for r in runs),
                   "decode_tok_s": statistics.median(r[1] for r in runs)}, f)


def llm_medians(llm, ids: list, new: int) -> dict:
    """One warm-up, then the median TTFT and decode rate of 3 generations of `new` tokens after `ids`."""
    from tp_runtime import SamplingParams

    params = SamplingParams(max_tokens=new, ignore_eos=True)
    llm.generate([ids], params)
    runs = []
    for _ in range(3):
        llm.generate([ids], params)
        runs.append(llm.last_timings)
    return {"ttft_ms": statistics.median(t.ttft_ms for t in runs),
            "decode_tok_s": statistics.median(t.decode_tokens_per_s for t in runs)}


def worker_tp(engine: str, threads: int, comm: str, compile: str, ids: list, new: int, out: str) -> None:
    from tp_runtime import LLM

    llm = LLM(engine, threads=threads, comm=comm, compile=compile)
    medians = llm_medians(llm, ids, new)
    if llm.rank == 0:
        with open(out, "w") as f:
            json.dump(medians, f)
    llm.close()


def ort_generator(model_dir: str, threads: int, ids: list, new: int):
    """ORT GenAI's model at `threads` intra-op threads; returns once() -> (TTFT ms, decode tok/s) of one greedy
    generation of `new` tokens after `ids`, EOS ignored."""
    import onnxruntime_genai as og

    cfg_path = os.path.join(model_dir, "genai_config.json")
    cfg = json.load(open(cfg_path))
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    json.dump(cfg, open(cfg_path, "w"), indent=1)
    model = og.Model(model_dir)

    def once():
        params = og.GeneratorParams(model)
        total = len(ids) + new
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        stamps = []
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        return (stamps[0] - t0) * 1000, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    return once


def worker_ort(model_dir: str, threads: int, ids: list, new: int, out: str) -> None:
    write_medians(ort_generator(model_dir, threads, ids, new), out)


def worker_hf(hf_dir: str, threads: int, ids: list, new: int, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    x = torch.tensor([ids])

    class Stamps:
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def once():
        s = Stamps()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, streamer=s)
        tokens = s.t[1:]  # the first put is the prompt
        return (tokens[0] - t0) * 1000, (len(tokens) - 1) / (tokens[-1] - tokens[0])

    write_medians(once, out)


def run_worker(args: list, ranks: int = 1) -> dict:
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, __file__, "--worker", json.dumps(args + [out])]
    if ranks > 1:
        cmd = [os.path.join(BIN, "mpirun"), "-n", str(ranks)] + cmd
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {args[0]}\n{res.stderr[-3000:]}")
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    return data


def read_bandwidth_gbs() -> float:
    code = ("import torch,time; torch.set_num_threads(2); x=torch.ones(1<<29); x.sum(); t=time.perf_counter();"
            "[x.sum() for _ in range(5)]; print(x.numel()*4*5/(time.perf_counter()-t)/1e9)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def engine_bytes(engine: str) -> int:
    from tp_runtime.engine import format as ef
    total = 0
    for name in sorted(os.listdir(engine)):
        if name.startswith("rank") and name.endswith(".safetensors"):
            path = os.path.join(engine, name)
            total += os.path.getsize(path) - ef.read_safetensors_header(path)[1]
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf_dir", default=None, help="default: SmolLM2-135M-Instruct from tp_runtime.assets")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b"],
                   help="llama-1b: random weights at configs/llama-1b-bench.json's shape (no ONNX Runtime rows)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_tp.json"))
    p.add_argument("--skip_ort", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, taking turns (the machine's speed drifts over "
                        "minutes); rows are medians and the ratio to the first row is the median of each round's")
    p.add_argument("--only", default=None, help="comma-separated substrings: keep the configurations they match")
    args = p.parse_args()
    from tp_runtime.assets import smollm2_hf_dir
    from tp_runtime.convert.pipeline import convert

    from transformers import AutoTokenizer

    text = open(os.path.join(HERE, "bench_decode.py")).read()
    ids = AutoTokenizer.from_pretrained(smollm2_hf_dir())(text)["input_ids"][:128]
    work = tempfile.mkdtemp(prefix="bench_cpu_tp-")
    hf = args.hf_dir or smollm2_hf_dir()
    if args.model == "llama-1b":
        from tp_runtime.convert.synthetic import load_preset, write_synthetic

        hf = os.path.join(work, "llama-1b")
        write_synthetic(load_preset("llama-1b-bench"), hf, dtype="float32", progress=False)
        ids = [i % 32000 for i in ids]
        args.skip_ort = True
    model_name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else "1B-class Llama (random weights)"
    rows = []
    try:
        e1, e2 = os.path.join(work, "tp1"), os.path.join(work, "tp2")
        convert(hf, e1, 1, progress=False)
        convert(hf, e2, 2, progress=False)
        n = args.new_tokens
        configs = [("tp_runtime tp=1 x 2 threads", ["tp", e1, 2, "auto", "on", ids, n], 1, e1),
                   ("tp_runtime tp=1 x 1 thread", ["tp", e1, 1, "auto", "on", ids, n], 1, e1),
                   ("tp_runtime tp=2 x 1 thread, shm", ["tp", e2, 1, "shm", "on", ids, n], 2, e1),
                   ("tp_runtime tp=2 x 1 thread, gloo", ["tp", e2, 1, "gloo", "on", ids, n], 2, e1),
                   ("tp_runtime tp=1 x 2 threads, eager", ["tp", e1, 2, "auto", "off", ids, n], 1, e1),
                   ("tp_runtime tp=2 x 1 thread, shm, eager", ["tp", e2, 1, "shm", "off", ids, n], 2, e1),
                   ("transformers, 2 threads", ["hf", hf, 2, ids, n], 1, e1)]
        if not args.skip_ort:
            for precision in ("fp32", "int4"):
                out_dir = os.path.join(work, f"ort_{precision}")
                env = dict(os.environ, HF_HUB_OFFLINE="1")
                subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out_dir,
                                "-p", precision, "-e", "cpu"], check=True, capture_output=True, env=env)
                configs.append((f"ONNX Runtime GenAI {precision}, 2 threads", ["ort", out_dir, 2, ids, n], 1,
                                out_dir))
        if args.only:
            keep = args.only.split(",")
            configs = [c for c in configs if any(k in c[0] for k in keep)]
        bandwidth = read_bandwidth_gbs()
        runs = {label: [] for label, *_ in configs}
        for rnd in range(args.rounds):
            for label, wargs, ranks, weights in configs:
                print(f"[bench_cpu_tp] round {rnd + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                runs[label].append(run_worker(wargs, ranks))
        first = configs[0][0]
        for label, wargs, ranks, weights in configs:
            r = {k: statistics.median(x[k] for x in runs[label]) for k in ("ttft_ms", "decode_tok_s")}
            r["decode_tok_s_rounds"] = [x["decode_tok_s"] for x in runs[label]]
            r["vs_first_row"] = statistics.median(
                x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs[label], runs[first]))
            nbytes = engine_bytes(weights) if weights in (e1, e2) else sum(
                os.path.getsize(os.path.join(weights, f)) for f in os.listdir(weights) if f.startswith("model.onnx"))
            ceiling = bandwidth * 1e9 / nbytes
            rows.append({"config": label, **r, "weight_bytes": nbytes, "ceiling_tok_s": ceiling,
                         "fraction_of_ceiling": r["decode_tok_s"] / ceiling})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{model_name}, fp32, 128 prompt ids, {args.new_tokens} new, greedy, batch 1; read bandwidth "
          f"{bandwidth:.1f} GB/s (2 threads); {args.rounds} round(s), medians\n")
    print(f"| configuration | TTFT ms | decode tok/s | vs {rows[0]['config']} | weights MB read per token | "
          "roofline tok/s | fraction |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['vs_first_row']:.2f}x | "
              f"{r['weight_bytes'] / 1e6:.0f} | {r['ceiling_tok_s']:.0f} | {r['fraction_of_ceiling']:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": model_name, "read_bandwidth_gbs": bandwidth, "rounds": args.rounds, "rows": rows}, f,
                  indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [r["config"] for r in rows]
        ax.barh(labels, [r["decode_tok_s"] for r in rows], color="#4477aa", label="decode tok/s")
        ax.scatter([r["ceiling_tok_s"] for r in rows], labels, color="#cc3311", marker="|", s=300,
                   label="bandwidth roofline")
        ax.set_xlabel("decode tokens/s, batch 1")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    except ImportError:
        print("(matplotlib not installed: no plot)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        a = json.loads(sys.argv[2])
        kind, rest = a[0], a[1:]
        {"tp": worker_tp, "ort": worker_ort, "hf": worker_hf}[kind](*rest)
        sys.exit(0)
    sys.exit(main())
