"""Every weight-only kernel of tp_runtime.runtime.woq beside fp32 F.linear, at SmolLM2-135M's shapes and 4096x4096.

    python benchmarks/bench_woq_kernels.py [--threads 2] [--batches 1 8] [--json OUT]

Per (shape, batch, kernel): microseconds per call (best of 5 rounds) and GB/s of weight bytes read
(int8: 1 byte a weight, int4: half, fp32: 4; scales not counted). fp32 is the runtime's own layout
(layers.pack_weight / matmul: tp_woq::f32_mm where tp_runtime's kernels build, else torch on a transposed
copy; the row's kernel names which). The int4 kernels run group 64 (576 is not a multiple of 128).

Then one decode step's worth of distinct weights streamed from memory, as in a real step (SmolLM2's 30 layers x
fused qkv 960x576, dense 576x576, fused gate/up 3072x576, proj 576x1536; 66-424 MB, more than the caches): per
kernel, milliseconds per pass of the 120 matmuls at batch 1 (median of 15 passes) and GB/s of every tensor the
kernel holds (codes, scales, zeros), int4 at group 32 (ONNX Runtime GenAI's block). native_int4_q8 / q8x2 also
run with the dot instruction forced down to AVX2's (tp_woq::q8_isa), as on a Zen 3.
"""

import argparse
import json
import sys
import time

import torch

from tp_runtime.runtime import woq
from tp_runtime.runtime.layers import matmul, pack_weight

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


STEP_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # SmolLM2's decode step, fused as loaded


def held_bytes(kernel) -> int:
    return sum(t.numel() * t.element_size() for t in kernel.buffers())  # a kernel it wraps included


def streamed(threads: int) -> list:
    """One decode step's distinct weights per kernel: ms per pass and GB/s of the bytes the kernels hold."""
    rows = []
    weights = [torch.randn(o, i) * 0.02 for o, i in STEP_SHAPES]
    xs = {i: torch.randn(1, i) for i in (576, 1536)}

    def run(label, fns, nbytes):
        def once():
            for fn, (_, i) in zip(fns, STEP_SHAPES):
                fn(xs[i])
        for _ in range(3):
            once()
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        rows.append(dict(kernel=label, ms=t * 1e3, mb=nbytes / 1e6, gbs=nbytes / t / 1e9))
        print(f"streamed {label}: {t * 1e3:.2f} ms", file=sys.stderr, flush=True)

    packed = [pack_weight(w) for w in weights]
    run(f"fp32 ({packed[0][1]})", [lambda v, p=p: matmul(v, *p) for p in packed],
        sum(p[0].numel() * 4 for p in packed))
    del packed
    for precision in ("int8", "int4"):
        qws = [quant_weight(w, precision, 32) for w in weights]
        for name in woq.candidates(qws[0], torch.float32):
            if name.startswith("dequant"):
                continue
            kernels = [woq.KERNELS[name](qw, torch.float32) for qw in qws]
            # (FBGEMM's tensors are in an opaque prepacked object: its codes' bytes are counted)
            nbytes = (sum(held_bytes(k) for k in kernels)
                      or sum(qw.q.numel() // (1 if precision == "int8" else 2) for qw in qws))
            run(name, kernels, nbytes)
            if name.startswith("native_int4_q8") and torch.ops.tp_woq.q8_isa(-1) > 0:
                best = torch.ops.tp_woq.q8_isa(-1)
                torch.ops.tp_woq.q8_isa(0)
                run(f"{name} (AVX2 dot)", kernels, nbytes)
                torch.ops.tp_woq.q8_isa(best)
            del kernels
    return rows


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
    stream = streamed(args.threads)
    print("\nOne decode step's 120 distinct weights (SmolLM2, int4 group 32), batch 1, streamed from memory:\n")
    print("| kernel | ms per step | MB held | GB/s |")
    print("|---|---|---|---|")
    for r in stream:
        print(f"| {r['kernel']} | {r['ms']:.2f} | {r['mb']:.1f} | {r['gbs']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_shape": rows, "streamed": stream}, f, indent=1)


if __name__ == "__main__":
    main()
