"""The Ray launcher's costs and speed against mpirun, with the real SmolLM2-135M-Instruct at fp32, tp=2.

    * Ray start-up: ray.init() of a new local cluster (seconds until it accepts work);
    * actors + load: RayEngine(engine) (placement group, 2 actors, rendezvous, weights loaded), and the part of it
      the ranks spend loading (LLM.load_s on rank 0);
    * decode tokens/s per sequence, batch 1, a 128-token prompt and 128 new tokens (EOS ignored), median of 3
      after a warm-up, through RayEngine and under mpirun (the same LLM calls in each rank); also the latency of
      one whole generate() as the caller sees it.

    .venv/bin/python benchmarks/bench_ray.py [--engine ENGINE] [--out benchmarks/results/ray.json]
Without --engine, SmolLM2 is fetched (python -m tp_runtime.assets smollm2 --hf) and converted at tp=2, fp32.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
PROMPT = [(i * 7919) % 40000 + 100 for i in range(128)]
NEW_TOKENS = 128
REPEATS = 3


def timed_generations(generate, timings) -> dict:
    """Warm-up, then REPEATS timed calls: median decode tokens/s (rank 0's clock) and caller latency."""
    from tp_runtime import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    generate(params)
    rates, latencies, ttfts = [], [], []
    for _ in range(REPEATS):
        t = time.perf_counter()
        out = generate(params)
        latencies.append(time.perf_counter() - t)
        assert len(out[0].output_ids) == NEW_TOKENS
        rates.append(timings().decode_tokens_per_s)
        ttfts.append(timings().ttft_ms)
    return {"decode_tokens_per_s": statistics.median(rates), "ttft_ms": statistics.median(ttfts),
            "latency_s": statistics.median(latencies), "output_ids": out[0].output_ids}


def worker_mpirun(engine: str, out: str) -> None:
    from tp_runtime import LLM

    t = time.perf_counter()
    llm = LLM(engine, max_batch_size=1)
    start_s = time.perf_counter() - t
    res = timed_generations(lambda p: llm.generate([PROMPT], p), lambda: llm.last_timings)
    if llm.rank == 0:
        with open(out, "w") as f:
            json.dump(dict(res, start_s=start_s, load_s=llm.load_s, threads=llm.threads), f)
    llm.close()


def bench_ray(engine: str) -> dict:
    import ray

    from tp_runtime import RayEngine

    t = time.perf_counter()
    ray.init(address="local", include_dashboard=False)
    ray_start_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        eng = RayEngine(engine, max_batch_size=1)
        engine_s = time.perf_counter() - t
        res = timed_generations(lambda p: eng.generate([PROMPT], p), lambda: eng.last_timings)
        cpus = eng.group.cpus_per_rank
        eng.shutdown()
    finally:
        ray.shutdown()
    return dict(res, ray_start_s=ray_start_s, start_s=engine_s, load_s=eng.load_s, threads=cpus)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default=None, help="a tp=2 engine (default: SmolLM2 converted at fp32)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "ray.json"))
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_mpirun(*args.worker)
        return 0
    work = tempfile.mkdtemp(prefix="bench-ray-")
    engine = args.engine
    if engine is None:
        hf = subprocess.run([sys.executable, "-m", "tp_runtime.assets", "smollm2", "--hf"], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
        engine = os.path.join(work, "smollm2-tp2-fp32")
        subprocess.run([os.path.join(BIN, "tp-convert"), "--model_dir", hf, "--output_dir", engine, "--tp_size", "2",
                        "--dtype", "float32"], check=True, capture_output=True)
    out = os.path.join(work, "mpirun.json")
    t = time.perf_counter()
    subprocess.run([os.path.join(BIN, "mpirun"), "-n", "2", sys.executable, __file__, "--worker", engine, out],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    mp_total = time.perf_counter() - t
    with open(out) as f:
        mp = json.load(f)
    ray_res = bench_ray(engine)
    same = ray_res.pop("output_ids") == mp.pop("output_ids")
    rows = {"mpirun": dict(mp, job_s=mp_total), "ray": ray_res, "same_output_ids": same,
            "prompt_tokens": len(PROMPT), "new_tokens": NEW_TOKENS}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"SmolLM2-135M fp32, tp=2 on this host, batch 1, {len(PROMPT)}+{NEW_TOKENS} tokens, median of {REPEATS}; "
          f"same output ids: {same}\n")
    print("| launcher | cluster start s | ranks start + load s (of which load) | threads/rank | TTFT ms "
          "| decode tok/s | generate() latency s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("mpirun", rows["mpirun"]), ("Ray (RayEngine)", ray_res)):
        cluster = f"{r['ray_start_s']:.1f}" if "ray_start_s" in r else "-"
        print(f"| {name} | {cluster} | {r['start_s']:.1f} ({r['load_s']:.2f}) | {r['threads']} | {r['ttft_ms']:.1f} "
              f"| {r['decode_tokens_per_s']:.1f} | {r['latency_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
