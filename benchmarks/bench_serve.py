"""Load test of tp-serve on loopback: SmolLM2-135M-Instruct at tp=1 and tp=2, 1 / 4 / 16 / 64 concurrent
streaming clients.

For each tp size this starts one server (`python -m tp_runtime.cli.serve`, which starts the tp=2 ranks itself),
waits for /health, measures its idle CPU use, sends two warm-up requests, then for each concurrency c
runs c client tasks (aiohttp) that send streaming chat completions back to back until max(8, 2c)
requests have been answered or --level_s has passed. Every request asks for --max_tokens tokens with
ignore_eos, so each produces exactly that many. Per level:
    req/s, output tok/s     answered requests and their tokens / wall time of the level
    TTFT p50 / p99          send -> first chunk with text (ms)
    ITL p50 / p99           gaps between chunks with text, over all requests (ms)
    errors                  non-200 answers, broken streams, wrong token counts (goal: 0)
Server RSS (all ranks) is read after a warm-up at the highest concurrency (which touches every cache slot
once), after each level, and after the last (goal: flat).

    .venv/bin/python benchmarks/bench_serve.py        # table, results/serve.json, results/serve.png
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from tp_runtime.distributed.launch import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.", "Explain what a compiler does.",
           "Name three animals that live in the sea.", "How do I boil an egg?", "Tell me a fun fact about space.",
           "Summarize the plot of Romeo and Juliet in two sentences.", "What is 17 times 23?",
           "Give me a tip for learning a new language.", "Why is the sky blue?"]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def server_procs(proc):
    import psutil

    root = psutil.Process(proc.pid)
    return [p for p in [root, *root.children(recursive=True)] if "tp_runtime.cli.serve" in " ".join(p.cmdline())]


def rss_mb(proc) -> float:
    """Resident memory of the rank processes (the local launcher's parent holds no model)."""
    procs = server_procs(proc)
    ranks = procs[1:] if len(procs) > 1 else procs
    return sum(p.memory_info().rss for p in ranks) / 2**20


def cpu_s(proc) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in server_procs(proc))


async def one_request(session, url: str, i: int, max_tokens: int) -> dict:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens, error = [], None, None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    except Exception as e:  # a broken connection counts as an error
        return {"error": f"{type(e).__name__}: {e}"}
    if error or tokens != max_tokens or not stamps:
        return {"error": error or f"{tokens} tokens instead of {max_tokens}"}
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens}


async def run_level(url: str, concurrency: int, n_requests: int, max_tokens: int, level_s: float) -> dict:
    import aiohttp

    results, counter = [], iter(range(n_requests))
    deadline = time.perf_counter() + level_s
    timeout = aiohttp.ClientTimeout(total=level_s + 120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client():
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                results.append(await one_request(session, url, i, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": sorted({r["error"] for r in results if "error" in r})[:3], "wall_s": wall,
            "req_per_s": len(ok) / wall, "output_tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_ms": percentile([r["ttft"] for r in ok], 50) * 1000,
            "ttft_p99_ms": percentile([r["ttft"] for r in ok], 99) * 1000,
            "itl_p50_ms": percentile(itl, 50) * 1000, "itl_p99_ms": percentile(itl, 99) * 1000}


def wait_healthy(url: str, proc, timeout: float = 240) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tp-serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("tp-serve did not become healthy")


def bench_tp(engine: str, tp: int, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "MPI_LOCAL"))}
    proc = subprocess.Popen([sys.executable, "-m", "tp_runtime.cli.serve", "--engine", engine, "--port", str(port),
                             "--served_model_name", "smollm2", "--max_batch_size", str(max(args.concurrency)),
                             "--max_seq_len", str(args.max_seq_len)], env=env)
    try:
        wait_healthy(url, proc)
        # Warm-up at the highest concurrency: every cache slot and the allocator's large-batch buffers get
        # touched once, so "RSS before" holds them and a growth after it would be a leak.
        top = max(args.concurrency)
        asyncio.run(run_level(url, top, top, args.max_tokens, args.level_s))
        time.sleep(1.0)
        c0, t0 = cpu_s(proc), time.perf_counter()
        time.sleep(args.idle_s)
        idle_cpu = (cpu_s(proc) - c0) / (time.perf_counter() - t0)
        rss_before = rss_mb(proc)
        levels = []
        for c in args.concurrency:
            level = asyncio.run(run_level(url, c, max(8, 2 * c), args.max_tokens, args.level_s))
            print(f"  tp={tp} c={c}: {level['req_per_s']:.2f} req/s, {level['output_tok_per_s']:.1f} tok/s, "
                  f"errors {level['errors']}", file=sys.stderr, flush=True)
            level["rss_after_mb"] = rss_mb(proc)
            levels.append(level)
        rss_after = rss_mb(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"tp": tp, "idle_cpu_cores": idle_cpu, "rss_before_mb": rss_before, "rss_after_mb": rss_after,
            "exit_code": proc.returncode, "levels": levels}


def table(results: list[dict]) -> str:
    head = ("| tp | clients | requests | req/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | errors |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        for lv in r["levels"]:
            rows.append(f"| {r['tp']} | {lv['concurrency']} | {lv['requests']} | {lv['req_per_s']:.2f} | "
                        f"{lv['output_tok_per_s']:.1f} | {lv['ttft_p50_ms']:.0f} / {lv['ttft_p99_ms']:.0f} | "
                        f"{lv['itl_p50_ms']:.1f} / {lv['itl_p99_ms']:.1f} | {lv['errors']} |")
    mem = "\n".join(f"tp={r['tp']}: server RSS {r['rss_before_mb']:.0f} MiB before, "
                    + ", ".join(f"{lv['rss_after_mb']:.0f}" for lv in r["levels"])
                    + f" MiB after each level; idle CPU {r['idle_cpu_cores'] * 100:.1f}% of a core; "
                      f"exit code {r['exit_code']}"
                    for r in results)
    return "\n".join([head, *rows]) + "\n\n" + mem


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in results:
        cs = [lv["concurrency"] for lv in r["levels"]]
        label = f"tp={r['tp']}"
        axes[0].plot(cs, [lv["output_tok_per_s"] for lv in r["levels"]], "o-", label=label)
        axes[1].plot(cs, [lv["ttft_p50_ms"] for lv in r["levels"]], "o-", label=f"{label} p50")
        axes[1].plot(cs, [lv["ttft_p99_ms"] for lv in r["levels"]], "x--", label=f"{label} p99")
        axes[2].plot(cs, [lv["itl_p50_ms"] for lv in r["levels"]], "o-", label=f"{label} p50")
        axes[2].plot(cs, [lv["itl_p99_ms"] for lv in r["levels"]], "x--", label=f"{label} p99")
    for ax, title in zip(axes, ["output tokens/s", "TTFT (ms)", "inter-token latency (ms)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("tp-serve, SmolLM2-135M-Instruct fp32, 2 CPU cores, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--level_s", type=float, default=60.0, help="time bound of one concurrency level")
    p.add_argument("--idle_s", type=float, default=3.0, help="idle period over which the server's CPU use is read")
    p.add_argument("--engine_root", default=None, help="where the converted engines go (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    args = p.parse_args(argv)

    from tp_runtime.assets import smollm2_hf_dir
    from tp_runtime.convert.pipeline import convert

    root = args.engine_root or tempfile.mkdtemp(prefix="bench_serve_")
    results = []
    for tp in args.tp:
        engine = os.path.join(root, f"smollm2_tp{tp}")
        if not os.path.isfile(os.path.join(engine, "config.json")):
            convert(smollm2_hf_dir(), engine, tp, progress=False)
        print(f"[bench_serve] tp={tp}", file=sys.stderr, flush=True)
        results.append(bench_tp(engine, tp, args))
    text = table(results)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct (fp32)", "max_tokens": args.max_tokens,
                   "max_seq_len": args.max_seq_len, "cpu_cores": os.cpu_count(), "results": results}, f, indent=1)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
