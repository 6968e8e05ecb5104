"""The decode ceiling of this machine for an engine: how fast can one process read its weights?

Two probes, 2 threads by default:
  * read bandwidth: torch.sum over a 2 GiB fp32 tensor (GB/s);
  * the engine's own matmuls: every weight matrix of rank 0 multiplied by a batch-1 vector, in model
    order, as one decode step would (ms per step, GB/s) - the time a decode step cannot go below
    without reading fewer bytes.
The tok/s ceiling is 1000 / (matmul ms per step).

--tp_ceiling PRESET (e.g. llama-1b-bench): the ceiling of "tp=2 x 1 thread against tp=1 x 2 threads" on this
machine, with no engine: random fp32 weights at the preset's decode-step shapes, streamed through tp_woq::f32_mm
by one process with 2 threads (all of them) and by two 1-thread processes side by side, each pinned to a core
(each its rank's half), taking turns for --rounds rounds; prints GB/s and the ratio per round.

    .venv/bin/python benchmarks/roofline.py --engine ENGINE [--threads 2]
    .venv/bin/python benchmarks/roofline.py --tp_ceiling llama-1b-bench [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
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
    from tp_runtime.runtime.layers import matmul

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


def preset_sweep(preset: str, share: int, threads: int, reps: int = 6) -> tuple[float, float]:
    """(seconds per step, bytes per step) of 1/share of the preset's decode-step weights through f32_mm."""
    from tp_runtime.runtime import native
    from tp_runtime.convert.synthetic import load_preset

    assert native.load(), native.why_not()
    torch.set_num_threads(threads)
    c = load_preset(preset)
    h, inter, vocab, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c.get("num_key_value_heads", c["num_attention_heads"])
    shapes = [((h + 2 * kv) // share, h), (h, h // share), (2 * inter // share, h), (h, inter // share)] * L
    shapes.append((vocab // share, h))
    ws = [torch.randn(o, i) for o, i in shapes]
    xs = [torch.randn(1, i) for _, i in shapes]

    def step():
        for w, x in zip(ws, xs):
            torch.ops.tp_woq.f32_mm(x, w)

    step()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t) / reps, sum(w.numel() * 4 for w in ws)


def tp_ceiling(preset: str, rounds: int) -> list:
    """Per round: GB/s of one 2-thread process over all weights, of two pinned 1-thread processes over a half
    each (their bytes over the slower one's time), and the ratio."""
    def spawn(share, threads, core=None):
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import roofline; "
                f"print(*roofline.preset_sweep({preset!r}, {share}, {threads}))")
        cmd = [sys.executable, "-c", code]
        if core is not None:
            cmd = ["taskset", "-c", str(core)] + cmd
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    out = []
    for r in range(rounds):
        p = spawn(1, 2)
        t1, b1 = map(float, p.communicate()[0].split())
        pair = [spawn(2, 1, core) for core in (0, 1)]
        res = [tuple(map(float, q.communicate()[0].split())) for q in pair]
        t2, b2 = max(t for t, _ in res), sum(b for _, b in res)
        out.append({"one_process_gbs": b1 / t1 / 1e9, "two_processes_gbs": b2 / t2 / 1e9, "ratio": t1 / t2})
        print(f"round {r + 1}: 1 process x 2 threads {b1 / t1 / 1e9:.1f} GB/s ({t1 * 1e3:.1f} ms), 2 processes x 1 "
              f"thread {b2 / t2 / 1e9:.1f} GB/s ({t2 * 1e3:.1f} ms): ceiling {t1 / t2:.2f}x", flush=True)
    print(f"median ceiling of tp=2 x 1 thread / tp=1 x 2 threads: {statistics.median(o['ratio'] for o in out):.2f}x")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default=None)
    p.add_argument("--tp_ceiling", default=None, metavar="PRESET")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tp_ceiling:
        res = tp_ceiling(args.tp_ceiling, args.rounds)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"preset": args.tp_ceiling, "rounds": res}, f, indent=1)
        return
    if not args.engine:
        p.error("--engine or --tp_ceiling is required")
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
