"""tp-run: generate text from an engine, in one process or as one rank of mpirun / torchrun.

Flags follow TensorRT-LLM's examples/run.py where one exists. A thin layer over tp_runtime.LLM:
every rank parses the same flags and builds the same LLM; rank 0 alone prints.
"""

import argparse
import json
import os
import statistics
import sys
import time

from tp_runtime import memory
from tp_runtime.memory import parse_size
from tp_runtime.errors import UserError, exit_on_user_error
from tp_runtime.runtime import woq
from tp_runtime.runtime.llm import LLM
from tp_runtime.runtime.kv_cache import DEFAULT_BLOCK_SIZE
from tp_runtime.runtime.options import DEFAULT_COMM_TIMEOUT_S, RuntimeOptions
from tp_runtime.runtime.sampling import SamplingParams

JSON_FORMAT_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tp-run", description="Run a tensor-parallel engine built by tp-convert.")
    p.add_argument("--engine", "--engine_dir", dest="engine", required=True, help="engine directory")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--input_text", nargs="+", default=None,
                     help="one or more prompts (the tokenizer's chat template is applied when it has one)")
    src.add_argument("--input_file", default=None,
                     help=".txt with one prompt per line, or .json with a list of strings or of token-id lists")
    src.add_argument("--input_ids", nargs="+", default=None,
                     help='token ids, e.g. "1,2,3" (one string per prompt); used verbatim, no template')
    p.add_argument("--max_output_len", type=int, default=64, help="new tokens per prompt (default %(default)s)")
    p.add_argument("--max_input_length", type=int, default=None,
                   help="refuse prompts longer than this many tokens (default: no limit but the engine's)")
    s = p.add_argument_group("sampling (defaults: the engine's generation_config.json, else greedy)")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    s.add_argument("--top_k", type=int, default=None, help="1 = greedy, 0 = off")
    s.add_argument("--top_p", type=float, default=None, help="in (0, 1]")
    s.add_argument("--repetition_penalty", type=float, default=None, help="1.0 = off")
    s.add_argument("--random_seed", type=int, default=None, help="seed of the sampler (default 0)")
    s.add_argument("--stop_words", nargs="+", default=[],
                   help="stop when one of these strings is generated (it is removed from the text)")
    s.add_argument("--ignore_eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer to use (default: the engine's)")
    p.add_argument("--no_prompt_template", action="store_true",
                   help="do not apply the tokenizer's chat template to --input_text / --input_file prompts")
    p.add_argument("--streaming", action="store_true", help="print text as it is generated (rank 0)")
    p.add_argument("--run_profiling", action="store_true",
                   help="repeat the generation 3 times and report the median latency, TTFT and decode rate")
    p.add_argument("--output_json", default=None, help="write outputs and timings to this file (rank 0)")
    add_runtime_args(p)
    add_launcher_args(p)
    return p


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """--launcher ray and its placement: the command starts its ranks as Ray actors (ray_engine.py)."""
    la = p.add_argument_group("launcher")
    la.add_argument("--launcher", default="auto", choices=["auto", "ray"],
                    help="auto: this process is a rank of mpirun/torchrun (or alone); ray: start the ranks as "
                         "Ray actors (default %(default)s)")
    add_ray_args(la)


def add_ray_args(p) -> None:
    """--placement and --ray_address, for the commands that can start their ranks as Ray actors."""
    p.add_argument("--placement", default="pack", choices=["pack", "spread"],
                   help="--launcher ray: every rank on one node (STRICT_PACK) or across nodes (SPREAD) "
                        "(default %(default)s)")
    p.add_argument("--ray_address", default=None,
                   help='--launcher ray: the Ray cluster ("auto": a running one; "local": a new local one; '
                        "host:port: that cluster; default: Ray's rule, else a new local one)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The run-time flags every engine-driving command shares (tp-run, tp-eval, tp-serve)."""
    r = p.add_argument_group("runtime")
    r.add_argument("--tp_size", type=int, default=None,
                   help="ranks to run on; an engine converted at another tp_size is re-sliced at load, each rank "
                        "reading only its slices of the engine's files (default: the engine's tp_size)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when torch sees a GPU, else CPU (default %(default)s)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: the cores the rank is bound to, minus --reserve_cores)")
    r.add_argument("--bind", default="auto", choices=["auto", "numa", "cores", "none"],
                   help="CPU binding of each local rank: a NUMA node each, an even slice of the cores, or none "
                        "(default %(default)s)")
    r.add_argument("--reserve_cores", type=int, default=0,
                   help="cores per rank left free of torch threads (default %(default)s)")
    r.add_argument("--max_batch_size", type=int, default=None,
                   help="sequences decoded at once (default: the engine's)")
    r.add_argument("--max_seq_len", type=int, default=None,
                   help="the longest sequence, prompt + output (default: the engine's)")
    r.add_argument("--kv_cache_memory", default=None,
                   help="KV cache per rank, e.g. 4GiB: a pool of blocks that sequences take as they grow "
                        "(default: room for --max_batch_size sequences of --max_seq_len)")
    r.add_argument("--block_size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="tokens per KV-cache block (default %(default)s)")
    r.add_argument("--no_prefix_cache", action="store_true",
                   help="do not reuse the cached blocks of a prompt prefix seen before")
    r.add_argument("--max_num_tokens", type=int, default=None,
                   help="prompt tokens one prefill step computes: longer prompts go in chunks between the decode "
                        "steps of running requests (default: no limit)")
    r.add_argument("--streaming_window", type=int, default=None,
                   help="StreamingLLM: each sequence keeps its first --sink_tokens and its latest N positions, so it "
                        "can go on past --max_seq_len in bounded memory (default: off)")
    r.add_argument("--sink_tokens", type=int, default=4,
                   help="StreamingLLM's attention sinks, rounded up to whole blocks (default %(default)s)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto: the engine's, or float32 on CPUs without native bf16/fp16 "
                        "(default %(default)s)")
    r.add_argument("--comm", default="auto", choices=["auto", "shm", "hier", "gloo"],
                   help="CPU communicator: auto = shared memory when all ranks share this host; across hosts "
                        "hier (shared memory within a host, one leader per host over TCP) when a host has 2+ "
                        "ranks, else gloo; NCCL on CUDA whatever this says (default %(default)s)")
    r.add_argument("--woq_kernel", default="auto",
                   help="weight-only quantized engines: the matmul kernel; auto: probed against the dequantized "
                        "weight, timed per layer shape at load and cached; or one of "
                        f"{', '.join(woq.KERNELS)} (default %(default)s)")
    r.add_argument("--comm_timeout", type=float, default=DEFAULT_COMM_TIMEOUT_S,
                   help="seconds before a collective gives up (default %(default)s)")
    r.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the decode step (auto: on where a C++ compiler or CUDA is present, or as "
                        "$TP_RUNTIME_COMPILE says, and for tp-run only when --max_output_len decode steps pay back "
                        "the compile, judged by the last compile on this machine); the compiled code is cached on "
                        "disk (default %(default)s)")


def options_from_args(args, **overrides) -> RuntimeOptions:
    """The RuntimeOptions that add_runtime_args' flags describe; overrides replace single settings."""
    return RuntimeOptions(device=args.device, tp_size=args.tp_size, threads=args.threads,
                          max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, dtype=args.dtype,
                          tokenizer_dir=args.tokenizer_dir, comm_timeout_s=args.comm_timeout, comm=args.comm,
                          bind=args.bind, reserve_cores=args.reserve_cores, compile=args.compile,
                          woq_kernel=args.woq_kernel, block_size=args.block_size,
                          kv_cache_memory=parse_size(args.kv_cache_memory, "--kv_cache_memory")
                          if args.kv_cache_memory else None,
                          prefix_cache=not args.no_prefix_cache,
                          max_num_tokens=args.max_num_tokens, streaming_window=args.streaming_window,
                          sink_tokens=args.sink_tokens).replace(**overrides)


def llm_from_args(args, **overrides) -> LLM:
    """The LLM that add_runtime_args' flags describe."""
    return LLM(args.engine, options_from_args(args, **overrides))


def read_inputs(args) -> tuple[list, bool]:
    """(prompts, are_token_ids)."""
    given = [x is not None for x in (args.input_text, args.input_file, args.input_ids)]
    if sum(given) != 1:
        raise UserError("give exactly one of --input_text, --input_file, --input_ids")
    if args.input_text is not None:
        return list(args.input_text), False
    if args.input_ids is not None:
        try:
            return [[int(t) for t in s.replace(" ", "").split(",") if t] for s in args.input_ids], True
        except ValueError:
            raise UserError('--input_ids takes comma-separated integers, e.g. --input_ids "1,2,3" "4,5"') from None
    path = args.input_file
    if not os.path.isfile(path):
        raise UserError(f"--input_file {path} does not exist")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"--input_file {path} is not valid JSON ({e})") from None
        if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
            return data, False
        if isinstance(data, list) and data and all(isinstance(x, list) and all(isinstance(t, int) for t in x)
                                                    for x in data):
            return data, True
        raise UserError(f"--input_file {path} must hold a JSON list of strings or a list of token-id lists")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise UserError(f"--input_file {path} has no prompts")
    return lines, False


def sampling_from_args(args) -> SamplingParams:
    params = SamplingParams(max_tokens=args.max_output_len, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.random_seed,
                            stop=list(args.stop_words), ignore_eos=args.ignore_eos)
    params.validate()
    return params


def output_json(results, timings, load_memory=(), after_run=()) -> dict:
    return {
        "format_version": JSON_FORMAT_VERSION,
        "outputs": [
            {"input_ids": r.input_ids, "output_ids": r.output_ids, "output_logprobs": r.output_logprobs,
             "text": r.text, "finish_reason": r.finish_reason}
            for r in results
        ],
        "timings": {"ttft_ms": timings.ttft_ms, "decode_tokens_per_s": timings.decode_tokens_per_s,
                    "prefill_tokens_per_s": timings.prefill_tokens_per_s, "total_s": timings.total_s},
        "memory_after_load": [{"rank": r, "anonymous": a, "mapped": m, "rss_before_load": b}
                              for r, (a, m, b) in enumerate(load_memory)],
        "memory_after_run": [{"rank": r, "anonymous": m["anonymous"], "mapped": m["mapped"], "rss": m["rss"],
                              "peak_rss": m["peak_rss"]} for r, m in enumerate(after_run)],
    }


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    prompts, are_ids = read_inputs(args)
    params = sampling_from_args(args)
    if args.max_input_length is not None and args.max_input_length < 1:
        raise UserError(f"--max_input_length must be >= 1, got {args.max_input_length}")
    if args.launcher == "ray":  # this process drives; the ranks run this main in Ray actors
        from tp_runtime.runtime.ray_engine import launch_console_script

        return launch_console_script(main, sys.argv[1:] if argv is None else list(argv), args.engine, args.device,
                                     args.threads, args.placement, args.ray_address, args.tp_size)
    llm = llm_from_args(args, decode_steps=args.max_output_len)  # one shot: compile only if it pays back
    lead = llm.rank == 0
    if lead:
        resliced = f" (re-sliced from {llm.reslicer.source.tp_size})" if llm.reslicer else ""
        print(f"[tp-run] {llm.config.source_architecture} tp_size={llm.config.tp_size}{resliced} device={llm.device} "
              f"comm={llm.comm.backend} "
              f"dtype={str(llm.dtype).removeprefix('torch.')} threads/rank={llm.threads} "
              f"loaded in {llm.load_s:.2f}s"
              + (f", decode step compiled in {llm.compile_s:.1f}s" if llm.compiled else ", eager decode")
              + (f" ({llm.compile_skipped}; --compile on forces it)" if llm.compile_skipped else ""),
              file=sys.stderr, flush=True)
        print("[tp-run] memory after load: " + "; ".join(
            f"rank {r} anonymous {a / 2**30:.2f} GiB, mapped {m / 2**30:.2f} GiB"
            for r, (a, m, _) in enumerate(llm.load_memory)), file=sys.stderr, flush=True)
        kernels = llm.kernel_summary()
        if kernels:
            print(f"[tp-run] weight-only kernels (rank 0): {kernels}", file=sys.stderr, flush=True)
        if llm.device.type == "cpu":
            for line in llm.binding_table():
                print(f"[tp-run] bind {line}", file=sys.stderr, flush=True)
    template = None if not args.no_prompt_template and not are_ids else False

    on_text = None
    if args.streaming and lead:
        def on_text(i, delta):
            print(delta if len(prompts) == 1 else f"[{i}] {delta}\n", end="", flush=True)

    results = llm.generate(prompts, params, chat_template=template, max_input_length=args.max_input_length,
                           on_text=on_text)
    timings = llm.last_timings
    if args.run_profiling:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate(prompts, params, chat_template=template, max_input_length=args.max_input_length)
            runs.append((time.perf_counter() - t0, llm.last_timings))
        if lead:
            t = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1].decode_tokens_per_s for r in runs)
            ttft = statistics.median(r[1].ttft_ms for r in runs)
            print(f"[tp-run] profiling, median of 3: latency {t * 1000:.1f} ms, TTFT {ttft:.1f} ms, "
                  f"decode {dec:.1f} tokens/s per sequence", file=sys.stderr)
    after = llm.comm.all_gather_object(memory.process())  # every weight touched now: what the run holds
    if lead:
        if args.streaming:
            print()
        else:
            for i, r in enumerate(results):
                shown = r.prompt if r.prompt is not None else r.input_ids
                print(f"Input [Text {i}]: {json.dumps(shown, ensure_ascii=False)}")
                print(f"Output [Text {i} Beam 0]: {json.dumps(r.text, ensure_ascii=False)}")
        print(f"[tp-run] TTFT {timings.ttft_ms:.1f} ms, decode {timings.decode_tokens_per_s:.1f} tokens/s per "
              f"sequence, prefill {timings.prefill_tokens_per_s:.1f} tokens/s, total {timings.total_s:.2f}s",
              file=sys.stderr)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(output_json(results, timings, llm.load_memory, after), f, indent=1, ensure_ascii=False)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
