"""The decode ceiling of this machine for an engine: how fast can one process read its weights?

Two probes, 2 threads by default:
  * read bandwidth: torch.sum over a 2 GiB fp32 tensor (GB/s);
  * the engine's own matmuls: every weight matrix of rank 0 multiplied by a batch-1 vector, in model
    order, as one decode step would (ms per step, GB/s) - the time a decode step cannot go below
    without reading fewer bytes.
The tok/s ceiling is 1000 / (matmul ms per step).

    .venv/bin/python benchmarks/roofline.py --engine ENGINE [--threads 2]
"""

import argparse
import json
import time

import torch


def bandwidth_gbs(gib: float = 2.0, reps: int = 5) -> float:
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    t = time.perf_counter()
    for _ in range(reps):
        x.sum()
    return x.numel() * 4 * reps / (time.perf_counter() - t) / 1e9


def matmul_sweep_ms(engine: str, reps: int = 10) -> tuple[float, float]:
    from tp_runtime import LLM

    llm = LLM(engine, threads=torch.get_num_threads())
    from tp_runtime.layers import matmul

    mods = [m for m in llm.model.modules() if hasattr(m, "layout") and m.weight is not None]
    weights = [m.weight for m in mods]
    vectors = [torch.randn(1, w.shape[0] if m.layout == "transposed" else w.shape[1], dtype=w.dtype) for m, w in zip(mods, weights)]

    def step():
        for m, v in zip(mods, vectors):
            matmul(v, m.weight, m.layout)

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    ms = (time.perf_counter() - t) / reps * 1000
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return ms, nbytes / ms / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bw = bandwidth_gbs()
    ms, gbs = matmul_sweep_ms(args.engine)
    res = {"threads": args.threads, "read_bandwidth_gbs": bw, "matmul_ms_per_step": ms, "matmul_gbs": gbs,
           "ceiling_tokens_per_s": 1000 / ms}
    print("| threads | read GB/s (sum) | weight matmuls ms/step | their GB/s | decode ceiling tok/s |")
    print("|---|---|---|---|---|")
    print(f"| {args.threads} | {bw:.1f} | {ms:.1f} | {gbs:.1f} | {1000 / ms:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
