"""The paged KV cache on SmolLM2-135M-Instruct (fp32, tp=1, one process): prefix reuse and capacity.

    prefix     a chat's first round (~1,000 prompt tokens), then a second round that adds a ~20-token
               question to the whole first conversation: TTFT of round 2 with the prefix cache, against
               round 1 and against round 2 with --no_prefix_cache (goal: round 2 <= 0.3x round 1)
    capacity   one KV-cache budget, the size a slot-per-request cache needs for --slots sequences of
               --max_seq_len: how many sequences the paged cache runs at once on requests whose prompt + output
               spread over 256..1,024 tokens (goal: >= 4x the slots), every output equal to its solo run (greedy)
    streaming  perplexity of a text --streaming_tokens long (4x+ the window), scored token by token through
               StreamingLLM's cache, per window-long stretch: 4 sink tokens + a --window window, the window alone
               (no sinks), and the whole text in the cache (the dense reference)

    .venv/bin/python benchmarks/bench_kv_cache.py [--slots 4 --max_seq_len 4096 --requests 32]
"""

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def text_ids(llm, n: int, seed: int) -> list[int]:
    """n token ids of English text (this repository's README, from a seeded line on)."""
    with open(os.path.join(HERE, "..", "README.md")) as f:
        lines = [line for line in f.read().splitlines() if len(line) > 40]
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        ids += llm.tokenizer(lines[rng.randrange(len(lines))], add_special_tokens=False)["input_ids"]
    return ids[:n]


def bench_prefix(engine: str, args) -> dict:
    from tp_runtime import LLM, SamplingParams

    params = SamplingParams(max_tokens=16, ignore_eos=True)
    out = {}
    for cached in (True, False):
        llm = LLM(engine, compile="off", max_batch_size=1, max_seq_len=2048, prefix_cache=cached)
        round1 = text_ids(llm, args.round1_tokens, seed=1)
        first = llm.generate([round1], params)[0]
        t1 = llm.last_timings.ttft_ms
        round2 = round1 + first.output_ids + text_ids(llm, args.round2_tokens, seed=2)
        second = llm.generate([round2], params)[0]
        out["cached" if cached else "cold"] = {"round1_ttft_ms": t1, "round2_ttft_ms": llm.last_timings.ttft_ms,
                                               "round2_ids": second.output_ids, "hit_rate": llm.blocks.hit_rate}
        llm.close()
    out["same_tokens"] = out["cached"]["round2_ids"] == out["cold"]["round2_ids"]
    return out


def bench_capacity(engine: str, args) -> dict:
    import torch

    from tp_runtime import LLM, SamplingParams
    from tp_runtime.runtime import kv_cache
    from tp_runtime.runtime.engine_loop import Scheduler, ServeRequest
    from tp_runtime.runtime.sequence import Request

    probe = LLM(engine, compile="off", max_batch_size=1, max_seq_len=args.max_seq_len)
    per_token = kv_cache.block_bytes(probe.config, 0, 1, probe.dtype)
    budget = args.slots * args.max_seq_len * per_token  # what slots x max_seq_len tokens take
    rng = random.Random(3)
    jobs = []
    for i in range(args.requests):
        total = rng.randrange(256, 1025)
        out_len = rng.randrange(16, 65)
        jobs.append((text_ids(probe, total - out_len, seed=100 + i), out_len))
    probe.close()

    llm = LLM(engine, compile="off", max_batch_size=args.requests, max_seq_len=args.max_seq_len,
              kv_cache_memory=budget + kv_cache.block_bytes(llm_config(engine), 0, 32, torch.float32),
              prefix_cache=False)
    peak, steps = [0], []

    def on_step(kind, rows, seconds):
        steps.append((kind, rows, seconds))
        if kind == "decode":
            peak[0] = max(peak[0], rows)

    done, errors = {}, []

    def collector(i):
        def on_event(ev):
            if ev.error:
                errors.append(ev.error)
            if ev.completion is not None:
                done[i] = ev.completion.output_ids
        return on_event

    sched = Scheduler(llm.model, llm.cache, llm.comm, llm.device, llm.eos_ids, on_step=on_step, blocks=llm.blocks)
    t0 = time.perf_counter()
    for i, (ids, n) in enumerate(jobs):
        req = Request(prompt_ids=ids, params=SamplingParams(max_tokens=n, ignore_eos=True).resolved(None))
        sched.submit(ServeRequest(req, collector(i)))
    while len(done) + len(errors) < len(jobs):
        sched.step()
    wall = time.perf_counter() - t0
    sched.shutdown("done")
    llm2 = llm  # solo runs on the same engine, one request at a time
    solo_same = 0
    for i, (ids, n) in enumerate(jobs):
        solo = llm2.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].output_ids
        solo_same += solo == done.get(i)
    llm.close()
    return {"budget_bytes": budget, "slots": args.slots, "max_seq_len": args.max_seq_len,
            "requests": args.requests, "peak_running": peak[0], "capacity_ratio": peak[0] / args.slots,
            "preemptions": llm.blocks.preemptions, "errors": len(errors), "same_as_solo": solo_same,
            "wall_s": wall, "output_tokens": sum(n for _, n in jobs)}


def bench_streaming(engine: str, args) -> dict:
    from tp_runtime import LLM
    from tp_runtime.cli.perplexity import default_text, tokenize

    runs = {"sinks 4 + window": (4, args.window), "window alone": (0, args.window),
            "dense (whole text cached)": (0, args.streaming_tokens + 64)}
    out = {}
    for name, (sinks, window) in runs.items():
        llm = LLM(engine, compile="off", max_batch_size=1, max_seq_len=window + 64, streaming_window=window,
                  sink_tokens=sinks)
        ids = tokenize(llm.tokenizer, default_text()[0], args.streaming_tokens)
        t0 = time.perf_counter()
        lps = llm.score_streaming(ids)
        seconds = time.perf_counter() - t0
        llm.close()
        step = args.window
        curve = [math.exp(-sum(lps[i : i + step]) / len(lps[i : i + step])) for i in range(0, len(lps), step)]
        out[name] = {"sinks": sinks, "window": window, "curve": curve,
                     "perplexity": math.exp(-sum(lps) / len(lps)), "tokens_per_s": len(lps) / seconds}
    return out


def llm_config(engine: str):
    from tp_runtime.engine.format import EngineConfig

    return EngineConfig.load(engine)


def print_streaming(streaming: dict, args) -> None:
    n = max(len(r["curve"]) for r in streaming.values())
    print(f"| perplexity per {args.window} tokens | " + " | ".join(f"..{(i + 1) * args.window}" for i in range(n))
          + " | all | tok/s |")
    print("|---" * (n + 3) + "|")
    for name, r in streaming.items():
        print(f"| {name} | " + " | ".join(f"{p:.2f}" for p in r["curve"]) + f" | {r['perplexity']:.2f} | "
              f"{r['tokens_per_s']:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--round1_tokens", type=int, default=1000)
    p.add_argument("--round2_tokens", type=int, default=20)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=4096)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--window", type=int, default=256, help="StreamingLLM's window")
    p.add_argument("--streaming_tokens", type=int, default=1280)
    p.add_argument("--only", choices=["prefix", "capacity", "streaming"], default=None)
    p.add_argument("--engine_root", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "kv_cache.json"))
    args = p.parse_args(argv)

    from tp_runtime.assets import smollm2_hf_dir
    from tp_runtime.convert.pipeline import convert

    root = args.engine_root or tempfile.mkdtemp(prefix="bench_kv_")
    engine = os.path.join(root, "smollm2_tp1")
    if not os.path.isfile(os.path.join(engine, "config.json")):
        convert(smollm2_hf_dir(), engine, 1, progress=False)
    if args.only == "streaming":
        streaming = bench_streaming(engine, args)
        print_streaming(streaming, args)
        return 0
    prefix = bench_prefix(engine, args)
    capacity = bench_capacity(engine, args)
    streaming = bench_streaming(engine, args)
    print_streaming(streaming, args)
    c, k = prefix["cached"], prefix["cold"]
    print("| measure | value |\n|---|---|")
    print(f"| round 1 TTFT ({args.round1_tokens} tokens) | {c['round1_ttft_ms']:.0f} ms |")
    print(f"| round 2 TTFT (+{args.round2_tokens} tokens), prefix cache | {c['round2_ttft_ms']:.0f} ms "
          f"({c['round2_ttft_ms'] / c['round1_ttft_ms']:.2f}x round 1; hit rate {c['hit_rate']:.2f}) |")
    print(f"| round 2 TTFT, --no_prefix_cache | {k['round2_ttft_ms']:.0f} ms |")
    print(f"| round 2 tokens equal with and without the cache | {prefix['same_tokens']} |")
    print(f"| KV budget = {args.slots} slots x {args.max_seq_len} tokens | {capacity['budget_bytes'] / 2**20:.0f} MiB |")
    print(f"| sequences running at once (peak), {args.requests} requests of 256..1,024 tokens | "
          f"{capacity['peak_running']} ({capacity['capacity_ratio']:.1f}x the slots) |")
    print(f"| preemptions, errors, outputs equal to solo runs | {capacity['preemptions']}, {capacity['errors']}, "
          f"{capacity['same_as_solo']}/{args.requests} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for side in prefix.values():
        if isinstance(side, dict):
            side.pop("round2_ids", None)
    with open(args.out, "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct (fp32, tp=1)", "prefix": prefix, "capacity": capacity,
                   "streaming": streaming}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
