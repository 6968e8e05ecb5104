"""A 20B-class model end to end on one machine: synthetic full-depth checkpoint -> tp-convert (RTN int4, int8,
AWQ int4; tp 1 and 2) -> load -> decode, one engine at a time, each deleted before the next.

For each engine:
  * conversion: wall time and peak anonymous memory (RssAnon + RssShmem of the tp-convert process, sampled
    every 0.2 s; mapped checkpoint pages are not counted: the kernel can drop them);
  * tp-plan's prediction of each rank's resident memory after load (weights as kept + KV cache + runtime);
  * load under mpirun (tp > 1) or alone: seconds, each rank's anonymous and mapped memory after load and
    its peak anonymous memory while loading;
  * TTFT of a --prompt_len-token prompt and decode tok/s after it (batch 1), decode tok/s at batch 4 (four
    prompts of 32-56 tokens);
  * tp-verify against the checkpoint (16 tokens, every layer): verdict and worst half;
  * the share of the memory roofline at batch 1: measured tok/s / (read bandwidth / bytes read per token),
    with the bandwidth of benchmarks/roofline.py (torch.sum over 2 GiB, all threads) and the bytes of every
    rank's weights a decode step reads (all but the embedding table, whose one row per token is free).
The checkpoint is written once (--keep_checkpoint keeps it for the next run) and deleted at the end.

    .venv/bin/python benchmarks/bench_20b.py --model internlm2-20b [--num_layers 48] \\
        [--engines int4:2,int4:1,int8:2,awq:2] [--work_dir /tmp/bench20b] --out benchmarks/results/20b_internlm2.json

Engine specs: PRECISION:TP with PRECISION int4 (RTN, group 128), int8 (per channel) or awq (int4 g128,
--calib_samples samples of --calib_seq_len tokens).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
GiB = 1 << 30


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_sampled(cmd: list[str], log: str) -> tuple[int, float, int]:
    """Run cmd, its output to `log`; (exit code, seconds, peak anonymous bytes of the process)."""
    from tp_runtime import memory

    t = time.perf_counter()
    peak = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
        while proc.poll() is None:
            peak = max(peak, memory.pid_anonymous(proc.pid))
            time.sleep(0.2)
    return proc.returncode, time.perf_counter() - t, peak


def convert_args(spec: str, hf: str, engine: str, args) -> list[str]:
    precision, tp = spec.split(":")
    cmd = [sys.executable, "-m", "tp_runtime.cli.convert", "--model_dir", hf, "--output_dir", engine,
           "--tp_size", tp, "--use_weight_only", "--no_progress", "--max_batch_size", "4",
           "--max_seq_len", str(args.max_seq_len)]
    if precision == "int8":
        return cmd + ["--weight_only_precision", "int8"]
    cmd += ["--weight_only_precision", "int4", "--group_size", "128"]
    if precision == "awq":
        cmd += ["--quant_algo", "awq", "--calib_samples", str(args.calib_samples),
                "--calib_seq_len", str(args.calib_seq_len)]
    return cmd


def predicted(engine: str, tp: int, batch: int, seq: int, compute: str = "auto") -> list[int]:
    """tp-plan's figures for each rank of this engine: weights as kept + KV cache + runtime, in bytes."""
    import torch

    from tp_runtime.engine import format as ef
    from tp_runtime.runtime import footprint
    from tp_runtime.runtime.llm import pick_compute_dtype

    cfg = ef.EngineConfig.load(engine)
    dtype = pick_compute_dtype(cfg.dtype, torch.device("cpu"), compute)
    return [footprint.rank_file_weight_bytes(os.path.join(engine, ef.rank_file(r)), dtype)
            + footprint.kv_cache_bytes(cfg, r, batch, seq, dtype) + footprint.RUNTIME_BYTES for r in range(tp)]


def step_bytes(engine: str, tp: int, compute: str = "auto") -> int:
    """Bytes every rank's decode step reads: its weights as kept, but the embedding table (one row a token)."""
    import torch

    from tp_runtime.engine import format as ef
    from tp_runtime.runtime import footprint
    from tp_runtime.runtime.llm import pick_compute_dtype

    cfg = ef.EngineConfig.load(engine)
    dtype = pick_compute_dtype(cfg.dtype, torch.device("cpu"), compute)
    total = 0
    for r in range(tp):
        entries = footprint.header_entries(footprint.read_header(os.path.join(engine, ef.rank_file(r))))
        tied = all(n != ef.LM_HEAD for n, _, _ in entries)
        total += footprint.weight_bytes([e for e in entries if tied or e[0] != ef.EMBEDDING], dtype)
    return total


def worker(args) -> None:
    """One rank of the decode run (under mpirun, or alone): rank 0 writes the JSON."""
    import torch

    from tp_runtime import LLM, SamplingParams, memory

    with memory.PeakSampler(0.05) as load_peak:
        t = time.perf_counter()
        llm = LLM(args.engine, max_batch_size=4, max_seq_len=args.max_seq_len, compile="off", dtype=args.compute_dtype)
        load_s = time.perf_counter() - t
    peaks = llm.comm.all_gather_object(load_peak.peak)
    vocab = llm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    # batch 1: one prompt of --prompt_len tokens (its TTFT); batch 4: four short prompts of different lengths
    prompts = [torch.randint(100, vocab - 100, (n,), generator=gen).tolist() for n in (args.prompt_len, 32, 40, 48, 56)]
    greedy = SamplingParams(max_tokens=args.new_tokens, greedy=True, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2, greedy=True, ignore_eos=True))  # warm-up
    out1 = llm.generate([prompts[0]], greedy)
    t1 = llm.last_timings
    out4 = llm.generate(prompts[1:], greedy)
    t4 = llm.last_timings
    after = llm.comm.all_gather_object(memory.process())
    if llm.rank == 0:
        result = {"load_s": load_s, "load_memory": llm.load_memory, "load_peak_anonymous": peaks,
                  "memory_after_run": after, "ttft_ms": t1.ttft_ms, "prompt_len": args.prompt_len,
                  "decode_tok_s_b1": t1.decode_tokens_per_s, "decode_tok_s_b4": t4.decode_tokens_per_s,
                  "tokens_b1": out1[0].output_ids, "distinct_tokens_b1": len(set(out1[0].output_ids)),
                  "kernels": llm.kernel_summary(), "dtype": str(llm.dtype), "threads": llm.threads,
                  "tokens_b4": [o.output_ids for o in out4]}
        with open(args.out, "w") as f:
            json.dump(result, f)


def decode_run(engine: str, tp: int, args, out: str, log: str) -> dict | None:
    threads = max(1, (os.cpu_count() or 2) // tp)
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--engine", engine, "--out", out,
          "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens),
          "--max_seq_len", str(args.max_seq_len), "--compute_dtype", args.compute_dtype]
    cmd = me if tp == 1 else [os.path.join(BIN, "mpirun"), "-n", str(tp), *me]
    env = child_env()
    env.setdefault("OMP_NUM_THREADS", str(threads))
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not os.path.isfile(out):
        return None
    with open(out) as f:
        return json.load(f)


def verify(engine: str, hf: str, tp: int, log: str) -> dict:
    """tp-verify of the engine against the checkpoint (16 tokens, every layer): exit code, verdict line, the
    worst half by out_cos, and its peak anonymous memory (rank 0, which runs the reference)."""
    cmd = [sys.executable, "-m", "tp_runtime.cli.verify", "--engine", engine, "--model_dir", hf,
           "--input_ids", ",".join(str(100 + 37 * i) for i in range(16)), "--compile", "off"]
    if tp > 1:
        cmd = [os.path.join(BIN, "mpirun"), "-n", str(tp), *cmd]
    rc, seconds, peak = run_sampled(cmd, log)
    with open(log) as f:
        lines = f.read().splitlines()
    verdict = next((ln for ln in lines if "PASS:" in ln or "FAIL:" in ln), "")
    rows = []
    for ln in lines:
        parts = ln.split()
        if len(parts) == 8 and parts[1] in ("attention", "MLP"):
            rows.append((float(parts[6]), float(parts[5]), parts[0], parts[1]))
    worst = min(rows) if rows else None
    return {"rc": rc, "seconds": seconds, "peak_anonymous_launcher": peak, "verdict": verdict,
            "worst": {"layer": worst[2], "half": worst[3], "out_cos": worst[0], "out_rel": worst[1]} if worst else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="internlm2-20b", help="preset: internlm2-20b, gpt-neox-20b, exaone-3.5-32b, ...")
    p.add_argument("--num_layers", type=int, default=None, help="layer count (default: the preset's full depth)")
    p.add_argument("--engines", default="int4:2,int4:1", help="PRECISION:TP,... (int4, int8, awq)")
    p.add_argument("--work_dir", default=None, help="where the checkpoint and engines go (default: a temp dir)")
    p.add_argument("--keep_checkpoint", action="store_true", help="keep (and reuse) the synthetic checkpoint")
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=1024)
    p.add_argument("--calib_samples", type=int, default=8)
    p.add_argument("--calib_seq_len", type=int, default=256)
    p.add_argument("--compute_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the runtime's compute dtype (auto: the engine's, float32 on CPUs without native bf16)")
    p.add_argument("--keep_engines", action="store_true", help="keep each engine, and reuse one already there")
    p.add_argument("--no_verify", dest="verify", action="store_false", help="skip tp-verify of each engine")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from roofline import bandwidth_gbs

    work = args.work_dir or tempfile.mkdtemp(prefix="bench20b-")
    os.makedirs(work, exist_ok=True)
    hf = os.path.join(work, f"{args.model}" + (f"-{args.num_layers}l" if args.num_layers else ""))
    rows = []
    try:
        if not os.path.isfile(os.path.join(hf, "config.json")):
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "tp_runtime.synthetic", "--config", args.model, "--output_dir", hf]
            if args.num_layers:
                cmd += ["--num_layers", str(args.num_layers)]
            subprocess.run(cmd, check=True, env=child_env())
            print(f"checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
        ckpt_bytes = sum(os.path.getsize(os.path.join(hf, n)) for n in os.listdir(hf) if n.endswith(".safetensors"))
        bw = bandwidth_gbs()
        print(f"checkpoint {ckpt_bytes / 1e9:.1f} GB; read bandwidth {bw:.1f} GB/s", flush=True)
        for spec in args.engines.split(","):
            precision, tp = spec.split(":")
            tp = int(tp)
            engine = os.path.join(work, f"engine-{precision}-tp{tp}")
            row = {"engine": spec, "compute_dtype": args.compute_dtype}
            if args.keep_engines and os.path.isfile(os.path.join(engine, "config.json")):
                rc = 0
                row.update(convert_rc=0, convert_s=float("nan"), convert_peak_anonymous=float("nan"), reused=True)
            else:
                shutil.rmtree(engine, ignore_errors=True)
                rc, conv_s, conv_peak = run_sampled(convert_args(spec, hf, engine, args), engine + ".convert.log")
                row.update(convert_rc=rc, convert_s=conv_s, convert_peak_anonymous=conv_peak)
                print(f"{spec}: converted in {conv_s:.0f} s, peak anonymous {conv_peak / GiB:.2f} GiB (rc {rc})",
                      flush=True)
            if rc == 0:
                row["engine_bytes"] = sum(os.path.getsize(os.path.join(engine, n)) for n in os.listdir(engine))
                row["predicted_rank_bytes"] = predicted(engine, tp, 4, args.max_seq_len, args.compute_dtype)
                row["step_bytes"] = step_bytes(engine, tp, args.compute_dtype)
                run = decode_run(engine, tp, args, engine + ".run.json", engine + ".run.log")
                row["run"] = run
                if run:
                    roof = bw * 1e9 / row["step_bytes"]
                    row["roofline_tok_s"] = roof
                    row["roofline_share_b1"] = run["decode_tok_s_b1"] / roof
                    print(f"{spec}: load {run['load_s']:.0f} s, anonymous + mapped after load "
                          f"{[(round(a / GiB, 2), round(m / GiB, 2)) for a, m, _ in run['load_memory']]} GiB (tp-plan: "
                          f"{[round(b / GiB, 2) for b in row['predicted_rank_bytes']]}), TTFT {run['ttft_ms']:.0f} ms, "
                          f"decode b1 {run['decode_tok_s_b1']:.2f} tok/s ({row['roofline_share_b1']:.0%} of "
                          f"{roof:.2f}), b4 {run['decode_tok_s_b4']:.2f} tok/s", flush=True)
                else:
                    print(f"{spec}: the decode run failed, see {engine}.run.log", flush=True)
                if args.verify:
                    row["verify"] = verify(engine, hf, tp, engine + ".verify.log")
                    print(f"{spec}: tp-verify {row['verify']['verdict']} worst {row['verify']['worst']} "
                          f"({row['verify']['seconds']:.0f} s)", flush=True)
            rows.append(row)
            if not args.keep_engines:
                shutil.rmtree(engine, ignore_errors=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"model": args.model, "num_layers": args.num_layers, "checkpoint_bytes": ckpt_bytes,
                               "bandwidth_gbs": bw, "rows": rows}, f, indent=1)
    finally:
        if not args.keep_checkpoint:
            shutil.rmtree(hf, ignore_errors=True)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| engine | convert s | convert peak anon GiB | load s | load peak anon GiB | anon + mapped after load "
          "GiB per rank (tp-plan) | RSS after the run GiB (tp-plan) | TTFT ms | b1 tok/s | roofline share | b4 tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        run = r.get("run") or {}
        mem = ", ".join(f"{a / GiB:.2f} + {m / GiB:.2f} ({b / GiB:.2f})" for (a, m, _), b in
                        zip(run.get("load_memory", []), r.get("predicted_rank_bytes", [])))
        after = ", ".join(f"{m['rss'] / GiB:.2f} ({b / GiB:.2f})" for m, b in
                          zip(run.get("memory_after_run", []), r.get("predicted_rank_bytes", [])))
        peaks = ", ".join(f"{p / GiB:.2f}" for p in run.get("load_peak_anonymous", []))
        print(f"| {r['engine']} | {r['convert_s']:.0f} | {r['convert_peak_anonymous'] / GiB:.2f} | "
              f"{run.get('load_s', float('nan')):.0f} | {peaks} | {mem} | {after} | {run.get('ttft_ms', float('nan')):.0f} | "
              f"{run.get('decode_tok_s_b1', float('nan')):.2f} | {r.get('roofline_share_b1', float('nan')):.0%} | "
              f"{run.get('decode_tok_s_b4', float('nan')):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
