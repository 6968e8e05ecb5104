"""Decode speed and time to first token of tp_runtime against transformers, on SmolLM2-135M-Instruct.

What it measures (the workload of /work/shared/PEERS.md):
  * batch 1: exactly --prompt_tokens prompt ids (the first ids of a fixed English text, the same list for
    every configuration), greedy, --new_tokens new tokens, EOS ignored.
      TTFT          = request start -> first new token
      decode tok/s  = (new_tokens - 1) / (time of the last token - time of the first token)
  * batch 8: eight different prompts (windows of the same text at different offsets, lengths spread from
    prompt_tokens/2 to prompt_tokens), --new_tokens each, EOS ignored.
      output tok/s  = total new tokens / wall time of the whole generate call

Configurations: tp_runtime tp=1 (one process, 2 threads), tp_runtime tp=2 (mpirun -n 2, 1 thread per
rank) and transformers (fp32, sdpa attention, 2 threads). Every (configuration, workload) pair runs in a
fresh process (this file re-invoked with --worker) that does one warm-up and then --runs measured runs;
the table shows medians.

How each side is timed:
  * tp_runtime: the Python API (LLM.generate); TTFT and decode tok/s come from llm.last_timings, which the
    generator stamps on rank 0 when each token is sampled (its decode rate is steps / time between the first
    and the last token, as above). Batch 8: wall time around llm.generate on rank 0.
  * transformers: model.generate with a streamer that stamps time.perf_counter() on every put(); the first
    put is the prompt, each later one is a new token, so TTFT and decode tok/s follow the same definitions
    from one call. EOS is kept out with min_new_tokens = max_new_tokens (it masks EOS, where tp_runtime's
    ignore_eos keeps it as a token: timing is the same, the text may differ after an EOS). Batch 8: left
    padding with the pad id, an attention mask, and wall time around generate.

    .venv/bin/python benchmarks/bench_decode.py --out results/decode.json
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

TEXT = (
    "The old lighthouse on the northern cape was built in the spring of 1871 by a crew of eleven masons who "
    "had never seen the sea before they arrived. They came from the inland quarries, where the granite was cut, "
    "and they brought their own tools, their own cook and a stubborn mule that refused to walk on sand. The "
    "first keeper was a retired ship's carpenter named Elias Marr, who kept a careful log of every storm, every "
    "passing vessel and every repair he made to the great brass lamp. His entries are short and plain: the wind "
    "from the west, the glass falling, three schooners sighted before noon, the wick trimmed twice. Over forty "
    "years he missed only one night, when a fever kept him in bed and his daughter climbed the tower in his place. "
    "Today the lamp is electric and turns by itself, and no one lives in the keeper's cottage. Visitors walk up the "
    "spiral stairs, count the one hundred and twelve steps, and look out over the water toward the islands. On a "
    "clear day they can see the ferry crossing to the harbor town, where fishing boats still unload their catch "
    "each morning at dawn. The town itself grew slowly. A school opened in 1890, a small library followed, and by "
    "the turn of the century there was a railway station with two platforms and a clock that was always four "
    "minutes fast. Farmers from the valley brought apples, cheese and wool to the Saturday market, and sailors "
    "traded news from distant ports over cups of strong coffee. When the cannery closed in the nineteen sixties, "
    "many families moved away to the cities, and for a while it seemed the town might empty completely. Then a "
    "group of teachers started a summer festival of music and painting, and artists began to rent the empty houses "
    "along the shore. Now the population is larger than it has ever been, and the old cannery holds studios, a "
    "bakery and a workshop where children learn to build wooden boats. The lighthouse log books are kept in the "
    "library, in a glass case near the window, open at the page where the keeper's daughter wrote her one entry: "
    "calm sea, bright stars, the lamp burning well, all ships safe."
)
BATCH = 8


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# ---------------------------------------------------------------- workers (one process per measurement)

def worker_tp(spec: dict) -> dict | None:
    from tp_runtime import LLM, SamplingParams

    llm = LLM(spec["engine"], threads=spec["threads"])
    params = SamplingParams(max_tokens=spec["new_tokens"], ignore_eos=True, greedy=True)
    prompts = spec["prompts"]
    runs, outputs = [], None
    for i in range(1 + spec["runs"]):  # the first is the warm-up
        t0 = time.perf_counter()
        results = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        t = llm.last_timings
        n_new = sum(len(r.output_ids) for r in results)
        if i > 0:
            runs.append({"ttft_ms": t.ttft_ms, "decode_tokens_per_s": t.decode_tokens_per_s,
                         "prefill_tokens_per_s": t.prefill_tokens_per_s, "total_s": t.total_s,
                         "wall_s": wall, "new_tokens": n_new, "output_tokens_per_s": n_new / wall})
        outputs = [r.output_ids for r in results]
    rank = llm.rank
    llm.close()
    return {"runs": runs, "output_ids": outputs} if rank == 0 else None


class StampStreamer:
    """A transformers streamer that only records when each put() happens (batch 1)."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def worker_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0
    prompts = spec["prompts"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    n = spec["new_tokens"]
    kwargs = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
    runs, outputs = [], None
    with torch.inference_mode():
        for i in range(1 + spec["runs"]):
            streamer = StampStreamer() if len(prompts) == 1 else None
            t0 = time.perf_counter()
            out = model.generate(ids, streamer=streamer, **kwargs)
            wall = time.perf_counter() - t0
            new = out[:, width:]
            outputs = new.tolist()
            if i == 0:
                continue
            run = {"wall_s": wall, "new_tokens": new.numel(), "output_tokens_per_s": new.numel() / wall}
            if streamer is not None:
                tok = streamer.stamps[1:]  # stamps[0] is the prompt
                run["ttft_ms"] = (tok[0] - t0) * 1000
                run["decode_tokens_per_s"] = (len(tok) - 1) / (tok[-1] - tok[0]) if len(tok) > 1 else 0.0
            runs.append(run)
    return {"runs": runs, "output_ids": outputs}


def worker_main(kind: str, spec_path: str, result_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    result = worker_tp(spec) if kind == "tp" else worker_hf(spec)
    if result is not None:
        with open(result_path, "w") as f:
            json.dump(result, f)
    return 0


# ---------------------------------------------------------------- the driver

def build_prompts(hf_dir: str, prompt_tokens: int) -> tuple[list[int], list[list[int]]]:
    """The batch-1 prompt and the eight batch prompts, all cut from TEXT's ids (repeated if too short)."""
    from transformers import AutoTokenizer

    ids = list(AutoTokenizer.from_pretrained(hf_dir)(TEXT, add_special_tokens=False)["input_ids"])
    stride = max(1, prompt_tokens // 3)
    need = (BATCH - 1) * stride + prompt_tokens
    while len(ids) < need:
        ids = ids + ids
    lo = max(1, prompt_tokens // 2)
    lengths = [lo + round(i * (prompt_tokens - lo) / (BATCH - 1)) for i in range(BATCH)]
    batch = [ids[i * stride: i * stride + n] for i, n in enumerate(lengths)]
    return ids[:prompt_tokens], batch


def run_worker(label: str, kind: str, spec: dict, work: str, ranks: int = 1) -> dict:
    spec_path = os.path.join(work, f"{label}.spec.json")
    result_path = os.path.join(work, f"{label}.result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, spec_path, result_path]
    if ranks > 1:
        cmd = [os.path.join(os.path.dirname(sys.executable), "mpirun"), "-n", str(ranks)] + cmd
    print(f"[bench_decode] {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # keep stdout for the table
    with open(result_path) as f:
        result = json.load(f)
    result["process_s"] = time.perf_counter() - t0
    return result


def convert_engine(hf_dir: str, work: str, tp: int) -> str:
    out = os.path.join(work, f"engine_tp{tp}")
    tool = os.path.join(os.path.dirname(sys.executable), "tp-convert")
    subprocess.run([tool, "--model_dir", hf_dir, "--output_dir", out, "--tp_size", str(tp), "--force",
                    "--no_progress"], check=True, stdout=sys.stderr)
    return out


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="measured runs after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=2, help="cores in all: tp=1 and transformers use them all, "
                                                          "tp=2 gives each rank threads // 2")
    p.add_argument("--out", default=None, help="JSON file for the raw results")
    p.add_argument("--work", default=None, help="folder for the engines (default: a temporary one, deleted)")
    p.add_argument("--skip_transformers", action="store_true")
    p.add_argument("--skip_batch", action="store_true", help="batch-1 measurements only")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)

    from tp_runtime.assets import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()
    work = args.work or tempfile.mkdtemp(prefix="bench_decode-")
    os.makedirs(work, exist_ok=True)
    single, batch = build_prompts(hf_dir, args.prompt_tokens)
    common = {"new_tokens": args.new_tokens, "runs": args.runs}
    configs = [("tp_runtime tp=1", "tp", 1, args.threads), ("tp_runtime tp=2", "tp", 2, max(1, args.threads // 2))]
    if not args.skip_transformers:
        configs.append(("transformers", "hf", 1, args.threads))
    results = {}
    try:
        engines = {tp: convert_engine(hf_dir, work, tp) for tp in (1, 2)}
        for name, kind, tp, threads in configs:
            spec = dict(common, threads=threads, engine=engines[tp], hf_dir=hf_dir)
            label = name.replace(" ", "_").replace("=", "")
            entry = {"ranks": tp, "threads_per_rank": threads}
            entry["batch1"] = run_worker(label + "-b1", kind, dict(spec, prompts=[single]), work, tp)
            if not args.skip_batch:
                entry["batch8"] = run_worker(label + "-b8", kind, dict(spec, prompts=batch), work, tp)
            results[name] = entry
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    ref = results.get("transformers")
    ref_rate = median_of(ref["batch1"]["runs"], "decode_tokens_per_s") if ref else None
    print(f"SmolLM2-135M-Instruct fp32, {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, greedy, "
          f"EOS ignored; median of {args.runs} runs after 1 warm-up; {args.threads} cores in all\n")
    print("| configuration | TTFT ms | decode tok/s | ratio vs transformers | batch-8 output tok/s |")
    print("|---|---|---|---|---|")
    for name, e in results.items():
        b1 = e["batch1"]["runs"]
        rate = median_of(b1, "decode_tokens_per_s")
        desc = f"{name} ({e['ranks']} x {e['threads_per_rank']} threads)"
        ratio = f"{rate / ref_rate:.2f}x" if ref_rate else "-"
        b8 = f"{median_of(e['batch8']['runs'], 'output_tokens_per_s'):.1f}" if "batch8" in e else "-"
        print(f"| {desc} | {median_of(b1, 'ttft_ms'):.0f} | {rate:.1f} | {ratio} | {b8} |")
    if ref:
        print("\nBatch 1, greedy tokens equal to transformers' before the first difference "
              f"({args.new_tokens} = identical; fp32 rounding may flip a near-tie):")
        for name, e in results.items():
            if name != "transformers":
                n = same_prefix(e["batch1"]["output_ids"][0], ref["batch1"]["output_ids"][0])
                print(f"- {name}: {n}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"model": hf_dir, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                       "runs": args.runs, "threads": args.threads, "batch1_prompt": single,
                       "batch8_prompt_lengths": [len(b) for b in batch], "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
