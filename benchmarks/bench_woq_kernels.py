"""Every weight-only kernel of tp_runtime.woq beside fp32 F.linear, at SmolLM2-135M's shapes and 4096x4096.

    python benchmarks/bench_woq_kernels.py [--threads 2] [--batches 1 8] [--json OUT]

Per (shape, batch, kernel): microseconds per call (best of 5 rounds) and GB/s of weight bytes read
(int8: 1 byte a weight, int4: half, fp32: 4; scales not counted). fp32 is the runtime's own layout
(layers.pack_weight / matmul: tp_woq::f32_mm where tp_runtime's kernels build, else torch on a transposed
copy; the row's kernel names which). The int4 kernels run group 64 (576 is not a multiple of 128).
"""

import argparse
import json
import sys
import time

import torch

from tp_runtime import woq
from tp_runtime.layers import matmul, pack_weight

SHAPES = [  # (out, in, what)
    (576, 576, "q / dense"),
    (192, 576, "k / v (3 KV heads)"),
    (1536, 576, "fc / gate"),
    (576, 1536, "proj"),
    (49152, 576, "lm_head"),
    (4096, 4096, "4096x4096"),
]


def per_call(fn, x, calls: int) -> float:
    for _ in range(3):
        fn(x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def quant_weight(w: torch.Tensor, precision: str, group: int) -> woq.QuantWeight:
    out_f, in_f = w.shape
    if precision == "int8":
        scale = w.abs().amax(1, keepdim=True) / 127
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        return woq.QuantWeight("int8", q, scale, None)
    wg = w.view(out_f, in_f // group, group)
    scale = wg.abs().amax(-1) / 7
    q = (torch.round(wg / scale.unsqueeze(-1)).clamp(-8, 7) + 8).to(torch.uint8).view(out_f, in_f)
    return woq.QuantWeight("int4", q, scale, None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for out_f, in_f, what in SHAPES:
        w = torch.randn(out_f, in_f) * 0.02
        big = out_f * in_f >= 16_000_000
        calls = 20 if big else 200
        for batch in args.batches:
            x = torch.randn(batch, in_f)
            packed, layout = pack_weight(w)
            t = per_call(lambda v: matmul(v, packed, layout), x, calls)
            rows.append(dict(shape=f"{out_f}x{in_f}", what=what, batch=batch, kernel=f"fp32 ({layout})",
                             us=t * 1e6, gbs=out_f * in_f * 4 / t / 1e9))
            if layout != "transposed":  # torch's own fp32 GEMV beside it
                wt = w.t().contiguous()
                t = per_call(lambda v: v @ wt, x, calls)
                rows.append(dict(shape=f"{out_f}x{in_f}", what=what, batch=batch, kernel="torch fp32 (x @ W^T)",
                                 us=t * 1e6, gbs=out_f * in_f * 4 / t / 1e9))
            for precision in ("int8", "int4"):
                qw = quant_weight(w, precision, 64)
                ref = x @ qw.dequantize().t()
                for name in woq.candidates(qw, torch.float32):
                    k = woq.KERNELS[name](qw, torch.float32)
                    err = (k(x) - ref).abs().max().item() / ref.abs().max().item()
                    t = per_call(k, x, max(2, calls // (10 if name.startswith("dequant") else 1)))
                    nbytes = out_f * in_f * (1 if precision == "int8" else 0.5)
                    rows.append(dict(shape=f"{out_f}x{in_f}", what=what, batch=batch, kernel=name, us=t * 1e6,
                                     gbs=nbytes / t / 1e9, rel_err=err))
            print(f"done {out_f}x{in_f} batch {batch}", file=sys.stderr, flush=True)
    print(f"\n{args.threads} threads, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}\n")
    print("| shape | batch | kernel | us/call | weight GB/s | vs fp32 time | max rel err |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        key = (r["shape"], r["batch"])
        if r["kernel"].startswith("fp32"):
            base[key] = r["us"]
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"| {r['shape']} ({r['what']}) | {r['batch']} | {r['kernel']} | {r['us']:.1f} | {r['gbs']:.1f} | "
              f"{base[key] / r['us']:.2f}x | {err} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
