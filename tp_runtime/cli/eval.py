"""tp-eval: quality checks of an engine, in one process or as one rank of mpirun / torchrun.

    tp-eval perplexity --engine E [--text_file F] [--max_tokens N] [--window W] [--stride S] [--hf_model_dir HF]
    tp-eval summarize  --engine E [--hf_model_dir HF] [--data FILE.jsonl] [--max_samples N] [--max_output_len L]

Every rank parses the same flags and builds the same LLM (tp_runtime.cli.run's run-time flags); rank 0
tokenizes, its inputs are broadcast, and it alone prints. The transformers comparison (--hf_model_dir)
runs on rank 0 once the engine has closed, so no collective ever waits on it.
"""

import argparse
import json
import math
import sys
import time

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError, exit_on_user_error
from tp_runtime.cli.run import add_runtime_args, llm_from_args

JSON_FORMAT_VERSION = 1
DEFAULT_WINDOW = 1024
DEFAULT_MAX_TOKENS = 8192


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tp-eval", description="Perplexity and summarization checks of an engine.")
    sub = p.add_subparsers(dest="command", required=True)

    ppl = sub.add_parser("perplexity", help="sliding-window perplexity of a text")
    ppl.add_argument("--text_file", default=None,
                     help="UTF-8 text to score (default: CPython's pydoc_data.topics, in sorted topic order)")
    ppl.add_argument("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
                     help="score the first N tokens of the text, 0 = all (default %(default)s)")
    ppl.add_argument("--window", type=int, default=None,
                     help=f"tokens per window (default {DEFAULT_WINDOW}, at most the engine's max_seq_len)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens between window starts (default window / 2); each token is scored once")

    summ = sub.add_parser("summarize", help="summaries of articles beside transformers', with ROUGE and tokens/s")
    summ.add_argument("--data", default=None,
                      help="jsonl with \"article\" and \"summary\" per line (default: the shipped "
                           "tp_runtime/data/summaries.jsonl)")
    summ.add_argument("--max_samples", type=int, default=None, help="use the first N articles (default: all)")
    summ.add_argument("--max_output_len", type=int, default=100, help="new tokens per summary (default %(default)s)")
    summ.add_argument("--batch_size", type=int, default=1,
                      help="articles per generate call, both sides (default %(default)s)")
    summ.add_argument("--prompt_style", default="auto", choices=["auto", "chat", "tldr"],
                      help="chat: the tokenizer's chat template around an instruction and the article; "
                           "tldr: '<article> TL;DR:'; auto: chat when the tokenizer has a template "
                           "(default %(default)s)")

    for sp in (ppl, summ):
        sp.add_argument("--engine", "--engine_dir", dest="engine", required=True, help="engine directory")
        sp.add_argument("--hf_model_dir", default=None,
                        help="the Hugging Face model to compare with (transformers, on rank 0, after the engine)")
        sp.add_argument("--hf_dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the transformers model (default %(default)s)")
        sp.add_argument("--tokenizer_dir", default=None, help="tokenizer to use (default: the engine's)")
        sp.add_argument("--output_json", default=None, help="write the results to this file (rank 0)")
        add_runtime_args(sp)
    return p


def on_rank0(llm, fn):
    """fn() on rank 0 (which holds the tokenizer), its result broadcast to every rank; a UserError
    there is raised on every rank."""
    job = None
    if llm.rank == 0:
        try:
            job = ("ok", fn())
        except UserError as e:
            job = ("error", str(e))
    kind, value = llm.comm.broadcast_object(job)
    if kind == "error":
        raise UserError(value)
    return value


def log(msg: str) -> None:
    print(f"[tp-eval] {msg}", file=sys.stderr, flush=True)


def describe(llm) -> str:
    return (f"{llm.config.source_architecture} tp_size={llm.config.tp_size} device={llm.device} "
            f"comm={llm.comm.backend} dtype={str(llm.dtype).removeprefix('torch.')} threads/rank={llm.threads}")


def write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)


def run_perplexity(args) -> int:
    from tp_runtime.cli.perplexity import engine_nll, read_text, sliding_windows, tokenize

    text, source = read_text(args.text_file)  # every rank: a bad file fails alike before any collective
    if args.max_tokens < 0 or args.max_tokens == 1:
        raise UserError(f"--max_tokens must be >= 2 (or 0 for the whole text), got {args.max_tokens}")
    cfg = ef.EngineConfig.load(args.engine)
    limit = args.max_seq_len or cfg.max_seq_len
    window = args.window or min(DEFAULT_WINDOW, limit)
    if window > limit:
        raise UserError(f"--window {window} is longer than the engine's max_seq_len {limit}; "
                        f"lower --window or raise --max_seq_len")
    stride = args.stride or max(1, window // 2)
    sliding_windows(window + 1, window, stride)  # checks window and stride before the weights load
    if args.streaming_window is not None:
        return run_streaming_perplexity(args, text, source)

    llm = llm_from_args(args, max_seq_len=window)  # a cache one window long
    lead = llm.rank == 0
    if lead:
        log(f"{describe(llm)} loaded in {llm.load_s:.2f}s")
    ids = on_rank0(llm, lambda: tokenize(llm.tokenizer, text, args.max_tokens))
    windows = sliding_windows(len(ids), window, stride)
    t0 = time.perf_counter()
    nll, count = engine_nll(llm, ids, windows, progress=lead and sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    cores = llm.allowed_cores
    llm.close()
    if not lead:
        return 0
    result = {"format_version": JSON_FORMAT_VERSION, "engine": args.engine, "tp_size": llm.config.tp_size,
              "dtype": str(llm.dtype).removeprefix("torch."), "text": source, "tokens": len(ids),
              "window": window, "stride": stride, "windows": len(windows), "tokens_scored": count,
              "nll_mean": nll / count, "perplexity": math.exp(nll / count), "seconds": seconds,
              "scored_tokens_per_s": count / seconds}
    log(f"{len(ids)} tokens of {source}: {len(windows)} windows of {window}, stride {stride}, "
        f"{count} tokens scored in {seconds:.1f}s")
    print(f"perplexity (engine): {result['perplexity']:.4f}")
    if args.hf_model_dir:
        from tp_runtime.convert.hf_reference import load_model, window_nll

        model = load_model(args.hf_model_dir, args.hf_dtype, cores)
        t0 = time.perf_counter()
        ref_nll, ref_count = window_nll(model, ids, windows)
        ref = {"model": args.hf_model_dir, "dtype": args.hf_dtype, "tokens_scored": ref_count,
               "nll_mean": ref_nll / ref_count, "perplexity": math.exp(ref_nll / ref_count),
               "seconds": time.perf_counter() - t0}
        result["transformers"] = ref
        print(f"perplexity (transformers): {ref['perplexity']:.4f}  "
              f"(engine / transformers - 1 = {result['perplexity'] / ref['perplexity'] - 1:+.2e})")
    write_json(args.output_json, result)
    return 0


def run_streaming_perplexity(args, text: str, source: str) -> int:
    """The whole text scored token by token through StreamingLLM's cache (--sink_tokens, --streaming_window), and
    the perplexity of each stretch of one window's length along it: flat while the sinks hold it up."""
    from tp_runtime.cli.perplexity import tokenize
    from tp_runtime.runtime.kv_cache import Streaming

    room = Streaming(args.sink_tokens, args.streaming_window, args.block_size, 1 << 40).capacity
    llm = llm_from_args(args, max_seq_len=max(args.max_seq_len or 0, room), max_batch_size=1)
    lead = llm.rank == 0
    if lead:
        log(f"{describe(llm)} loaded in {llm.load_s:.2f}s")
    ids = on_rank0(llm, lambda: tokenize(llm.tokenizer, text, args.max_tokens))
    t0 = time.perf_counter()
    lps = llm.score_streaming(ids)
    seconds = time.perf_counter() - t0
    llm.close()
    if not lead:
        return 0
    step = args.streaming_window
    curve = [[min(i + step, len(lps)), math.exp(-math.fsum(lps[i : i + step]) / len(lps[i : i + step]))]
             for i in range(0, len(lps), step)]
    result = {"format_version": JSON_FORMAT_VERSION, "engine": args.engine, "mode": "streaming",
              "sink_tokens": args.sink_tokens, "streaming_window": args.streaming_window, "text": source,
              "tokens": len(ids), "tokens_scored": len(lps), "nll_mean": -math.fsum(lps) / len(lps),
              "perplexity": math.exp(-math.fsum(lps) / len(lps)), "curve": curve, "seconds": seconds}
    log(f"{len(ids)} tokens of {source} through {args.sink_tokens} sink tokens + a window of "
        f"{args.streaming_window}, {len(lps)} scored in {seconds:.1f}s")
    for end, ppl in curve:
        log(f"tokens ..{end}: perplexity {ppl:.3f}")
    print(f"perplexity (engine, streaming): {result['perplexity']:.4f}")
    write_json(args.output_json, result)
    return 0


def run_summarize(args) -> int:
    from tp_runtime.runtime.sampling import SamplingParams
    from tp_runtime.cli.summarize import DEFAULT_DATA, ROUGE_KEYS, prompt_ids, read_data, rouge, rouge_scorer_module

    data_path = args.data or DEFAULT_DATA
    samples = read_data(data_path, args.max_samples)  # every rank: a bad file fails alike before any collective
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    params = SamplingParams(max_tokens=args.max_output_len, greedy=True, repetition_penalty=1.0)
    params.validate()
    rouge_scorer_module()  # fails now, not after the generation, when rouge-score is missing
    llm = llm_from_args(args)
    lead = llm.rank == 0
    if lead:
        log(f"{describe(llm)} loaded in {llm.load_s:.2f}s; {len(samples)} articles from {data_path}")
    prompts = on_rank0(llm, lambda: [prompt_ids(llm, s["article"], args.prompt_style) for s in samples])
    outputs, seconds = [], 0.0
    for i in range(0, len(prompts), args.batch_size):
        t0 = time.perf_counter()
        outputs += llm.generate(prompts[i : i + args.batch_size], params)
        seconds += time.perf_counter() - t0
    cores, eos_ids = llm.allowed_cores, set(llm.eos_ids)
    llm.close()
    if not lead:
        return 0

    refs = [s["summary"] for s in samples]
    sides = {"engine": ([o.output_ids for o in outputs], [o.text for o in outputs], seconds)}
    if args.hf_model_dir:
        from tp_runtime.convert import hf_reference
        model = hf_reference.load_model(args.hf_model_dir, args.hf_dtype, cores)
        pad = llm.tokenizer.pad_token_id
        pad = pad if pad is not None else min(eos_ids, default=0)
        hf_ids, hf_s = hf_reference.generate(model, prompts, args.max_output_len, eos_ids, pad, args.batch_size)
        sides["transformers"] = (hf_ids, [llm.decode(ids) for ids in hf_ids], hf_s)

    result = {"format_version": JSON_FORMAT_VERSION, "engine": args.engine, "tp_size": llm.config.tp_size,
              "data": data_path, "max_output_len": args.max_output_len, "samples": []}
    for i, s in enumerate(samples):
        row = {"reference": s["summary"], "input_ids": prompts[i]}
        for name, (ids, texts, _) in sides.items():
            row[name] = {"text": texts[i], "output_ids": ids[i]}
        result["samples"].append(row)
        print(f"[{i}] reference:    {s['summary']}")
        for name, (_, texts, _) in sides.items():
            print(f"[{i}] {name + ':':13} {texts[i]}")
    print()
    print(f"{'':13} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for name, (ids, texts, secs) in sides.items():
        scores = rouge(texts, refs)
        tokens = sum(len(x) for x in ids)
        result[name] = {**scores, "output_tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}
        print(f"{name:13} " + " ".join(f"{scores[k]:8.2f}" for k in ROUGE_KEYS)
              + f" {tokens:7d} {secs:8.2f} {tokens / secs:9.1f}")
    if "transformers" in sides:
        same = sum(a == b for a, b in zip(sides["engine"][0], sides["transformers"][0]))
        result["identical_summaries"] = same
        print(f"identical token ids, engine vs transformers: {same}/{len(samples)}")
    write_json(args.output_json, result)
    return 0


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_perplexity(args) if args.command == "perplexity" else run_summarize(args)


if __name__ == "__main__":
    sys.exit(main())
