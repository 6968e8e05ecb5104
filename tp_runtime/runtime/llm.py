"""The Python API: LLM(engine_dir).generate(prompts, SamplingParams(...)).

Works in one process and in every rank of a job started by mpirun or torchrun: every rank builds
the LLM and calls generate with the same arguments; rank 0's prompts and parameters are the ones
used (they are broadcast), and every rank gets rank 0's results back.

Start-up order, so that a user mistake fails alike on every rank before any collective:
read config.json -> check every rank file -> (tp_size M given: plan the re-slicing, runtime/reslice.py) ->
check world size == M or the engine's tp_size -> set threads -> communicator -> check that every host's ranks
fit its memory (weights + KV cache, runtime/footprint.py) -> load this rank's file (or its slices of the N
files) -> build the model and the KV cache.
"""

import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from tp_runtime import cpu, env, memory
from tp_runtime.engine import format as ef
from tp_runtime.runtime import woq

from tp_runtime.distributed.communicator import make_communicator
from tp_runtime.errors import UserError, read_json_object
from tp_runtime.runtime import engine_loop
from tp_runtime.runtime.sequence import Request, Timings
from tp_runtime.distributed.binding import apply_binding, plan_binding, read_numa_nodes
from tp_runtime.distributed.launch import detect_launch
from tp_runtime.runtime import compile as compile_step
from tp_runtime.runtime import footprint
from tp_runtime.runtime.compile import COMPILE_SPAN, compile_decode
from tp_runtime.runtime import kv_cache
from tp_runtime.runtime.kv_cache import BlockManager, KVCache, Streaming
from tp_runtime.runtime.model import TPDecoder
from tp_runtime.runtime.options import RuntimeOptions
from tp_runtime.runtime.rank_file import RankTensors
from tp_runtime.runtime.reslice import Reslicer
from tp_runtime.runtime.sampling import SamplingParams

DTYPES = ef.DTYPES


@dataclass
class RequestOutput:
    prompt: str | None
    input_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    text: str
    finish_reason: str


def pick_compute_dtype(storage: str, device: torch.device, requested: str = "auto") -> torch.dtype:
    """On CPUs without native bf16/fp16 (no AVX512_BF16 / AMX, no AVX512_FP16), half-precision matmuls
    run ~100x slower than fp32, so compute there in float32 whatever the engine stores."""
    if requested != "auto":
        if device.type == "cpu" and requested != "float32" and not cpu.native_half(requested):
            warnings.warn(f"--dtype {requested} on a CPU without native {requested} ({cpu.describe()}): its matmuls "
                          "run far slower than float32's; --dtype auto computes in float32 here", RuntimeWarning,
                          stacklevel=2)
        return DTYPES[requested]
    dtype = DTYPES[storage]
    if device.type == "cpu" and dtype != torch.float32 and not cpu.native_half(storage):
        return torch.float32
    return dtype


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device (is this the CPU build?)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"local rank {local_rank} has no GPU: this host has {count}; start fewer ranks per host")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


COMPILE_MODES = ("auto", "on", "off")
COMPILE_BARRIER_S = 900  # how long ranks wait for the slowest one to compile its decode step


def compile_mode(requested: str) -> str:
    """--compile's value, with auto replaced by $TP_RUNTIME_COMPILE where that is set."""
    if requested not in COMPILE_MODES:
        raise UserError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {requested!r}")
    if requested == "auto":
        requested = env.compile_mode()
        if requested not in COMPILE_MODES:
            raise UserError(f"TP_RUNTIME_COMPILE must be one of {', '.join(COMPILE_MODES)}, got {requested!r}")
    return requested


def pick_compile(requested: str, device: torch.device) -> bool:
    """Whether to compile the decode step. auto: $TP_RUNTIME_COMPILE (on/off) if set, else on where
    Inductor can build its code (CUDA, or a CPU with a C++ compiler on PATH), at any tp size."""
    requested = compile_mode(requested)
    has_compiler = device.type == "cuda" or any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    if requested == "on" and not has_compiler:
        raise UserError("--compile on needs a C++ compiler on PATH for torch.compile on CPU (install g++), "
                        "or use --compile off")
    return requested == "on" or (requested == "auto" and has_compiler)


class LLM:
    def __init__(self, engine_dir: str, options: RuntimeOptions | None = None, **kwargs):
        """options: the run-time settings (runtime/options.py); keyword arguments replace single ones, e.g.
        LLM("ENGINE", compile="off", max_batch_size=4). decode_steps: the most decode steps this engine will run,
        where known (a one-shot tp-run): with compile auto, a run too short to pay back the compile decodes
        eagerly. None: long-lived."""
        opts = self.options = (options or RuntimeOptions()).replace(**kwargs)
        cpu.cap()  # a wrong TP_RUNTIME_ISA is a user error before anything loads
        device, threads, dtype, compile = opts.device, opts.threads, opts.dtype, opts.compile
        max_batch_size, max_seq_len, reserve_cores, bind = opts.max_batch_size, opts.max_seq_len, opts.reserve_cores, opts.bind
        self.engine_dir = engine_dir
        self.info = detect_launch()
        self.rank = self.info.rank
        cfg = ef.EngineConfig.load(engine_dir)
        ef.check_rank_files(engine_dir, cfg.tp_size)
        self.reslicer = None  # the engine's files re-sliced for opts.tp_size ranks at load
        if opts.tp_size is not None and opts.tp_size != cfg.tp_size:
            self.reslicer = Reslicer(engine_dir, cfg, opts.tp_size)  # an impossible tp_size fails here, on every rank
            cfg = self.reslicer.config
        self.config = cfg
        if self.info.world_size != cfg.tp_size:
            what = (f"the engine {engine_dir} (converted at tp_size={self.reslicer.source.tp_size}) is asked for "
                    f"--tp_size {cfg.tp_size}" if self.reslicer else
                    f"the engine {engine_dir} was converted for tp_size={cfg.tp_size}")
            raise UserError(
                f"{what}, but {self.info.world_size} rank(s) were started; start {cfg.tp_size} (e.g. mpirun -n "
                f"{cfg.tp_size}) or pass --tp_size {self.info.world_size} to re-slice it at load"
            )
        if dtype not in ("auto", *DTYPES):
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
        self.max_batch_size = max_batch_size or cfg.max_batch_size
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        if self.max_batch_size < 1 or self.max_seq_len < 2 or opts.block_size < 1:
            raise UserError(f"--max_batch_size and --block_size must be >= 1 and --max_seq_len >= 2, got "
                            f"{self.max_batch_size}, {opts.block_size} and {self.max_seq_len}")
        self.block_size, self.prefix_cache = opts.block_size, opts.prefix_cache
        self.streaming = None  # StreamingLLM's sinks and window (the prefix cache is then off: keys move)
        if opts.streaming_window is not None:
            self.streaming = Streaming(opts.sink_tokens, opts.streaming_window, self.block_size, self.max_seq_len)
            self.prefix_cache = False
        self.device = pick_device(device, self.info.local_rank)
        if threads is not None and threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        if reserve_cores < 0:
            raise UserError(f"--reserve_cores must be >= 0, got {reserve_cores}")
        if threads is None and self.info.cpus:  # the CPUs a launcher granted this rank (a Ray bundle)
            threads = max(1, self.info.cpus - reserve_cores)
        # Bind and set threads before any weight is touched: first-touch then places them near the cores.
        self.allowed_cores, self.numa_nodes = tuple(sorted(os.sched_getaffinity(0))), read_numa_nodes()
        self.bind_mode, self.reserve_cores = bind, reserve_cores
        self.binding = plan_binding(self.allowed_cores, self.numa_nodes, self.info.local_rank,
                                    self.info.local_world_size, bind, reserve_cores, threads)
        self.threads = self.binding.threads
        if self.device.type == "cpu":
            apply_binding(self.binding)
            torch.set_num_threads(self.threads)
        self.dtype = pick_compute_dtype(cfg.dtype, self.device, dtype)
        self.generation_config = self._read_generation_config()
        self.tokenizer_dir = opts.tokenizer_dir or engine_dir
        self._tokenizer = None

        t0 = time.perf_counter()
        self.comm = make_communicator(self.info, self.device, opts.comm_timeout_s, opts.comm)
        self.num_blocks = self._agree_on_blocks(opts.kv_cache_memory)
        show = self.rank == 0 and sys.stderr.isatty()  # rank 0 alone draws the bar
        if self.reslicer is None:
            sources = [os.path.join(engine_dir, ef.rank_file(self.rank))]
            weight_bytes = footprint.rank_file_weight_bytes(sources[0], self.dtype)
        else:
            sources = self.reslicer.source_paths(self.rank)
            weight_bytes = footprint.weight_bytes(self.reslicer.entries(self.rank), self.dtype)
        self._check_memory(weight_bytes)
        before = memory.process()["rss"]
        if self.reslicer is None:  # each tensor read as the model takes it
            weights = RankTensors(sources[0], self.dtype, self.device)
        else:
            weights = self.reslicer.rank_tensors(self.rank, self.dtype, self.device)
        self.model = TPDecoder(cfg, self.rank, weights, self.comm, self.max_seq_len, opts.woq_kernel,
                               opts.native_attention, progress=show).eval()
        weights.close()
        del weights
        for path in sources:  # what the build read through the mapping (the fused fc + gate's parts)
            memory.release_file_pages(path)
        memory.trim_heap()  # and the transient buffers it freed
        self.cache = KVCache(cfg, self.rank, self.num_blocks, self.block_size, self.max_batch_size, self.max_seq_len,
                             self.dtype, self.device)
        # rank 0's bookkeeping of the pool, kept across generate calls (a later prompt reuses an earlier prefix)
        self.blocks = BlockManager(self.num_blocks, self.block_size, self.prefix_cache) if self.rank == 0 else None
        # every rank's memory after load, [(anonymous, mapped, resident before load) bytes] in rank order
        mine = memory.process()
        self.load_memory = self.comm.all_gather_object((mine["anonymous"], mine["mapped"], before))
        eos = self.generation_config.get("eos_token_id", cfg.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or cfg.eos_token_id or [])
        self.eos_ids = set(eos)
        self.load_s = time.perf_counter() - t0
        self.compiled = pick_compile(compile, self.device)
        if self.compiled and compile == "auto" and self.max_seq_len < COMPILE_SPAN:
            self.compiled = False  # a cache this short is a test engine, not one worth compiling for
        untraceable = sorted({m.kernel_name for m in self.model.modules()
                              if isinstance(m, woq.WeightOnlyLinear) and not m.kernel.traceable})
        if self.compiled and untraceable:
            if compile == "on":
                raise UserError(f"--compile on cannot trace the {', '.join(untraceable)} kernel; use --compile off "
                                f"or another --woq_kernel")
            self.compiled = False  # auto: the eager step serves
        self.compile_s = 0.0
        self.compile_skipped = ""  # why --compile auto decodes eagerly, when it was the run's length
        batch = min(2, self.max_batch_size)
        key = compile_step.compile_key(cfg, self.threads, self.dtype, batch)
        last_s = compile_step.last_compile_s(key)
        if self.compiled and compile_mode(compile) == "auto" and not compile_step.pays_back(opts.decode_steps, last_s):
            self.compiled = False
            self.compile_skipped = (f"{opts.decode_steps} decode steps would not pay back compiling the step "
                                    f"({'~%.0f s last time here' % last_s if last_s else 'never compiled here'})")
        # rank 0 decides for all (the times file is per host, and written when rank 0 finishes compiling)
        self.compiled, self.compile_skipped = self.comm.broadcast_object((self.compiled, self.compile_skipped))
        if self.compiled:  # compile without collectives (ranks compile at their own pace), then meet
            if self.rank == 0:
                print(f"[tp_runtime] compiling the decode step for batch 1{' and 2+' if batch > 1 else ''} "
                      f"({'%.0f s last time on this machine' % last_s if last_s else 'first time on this machine: minutes on a few cores'}"
                      f"; --compile off skips it)", file=sys.stderr, flush=True)
            self.comm.offline = True
            try:
                step = compile_decode(self.model, self.cache, batch, opts.compile_path, freeze=opts.freeze)
                self.model.compiled_step, self.compile_s = step, step.seconds
            finally:
                self.comm.offline = False
            if self.rank == 0:
                compile_step.remember_compile_s(key, self.compile_s)
            self.comm.barrier(timeout_s=max(COMPILE_BARRIER_S, opts.comm_timeout_s))
        self.last_timings = Timings()

    # --- set-up helpers ---

    def _agree_on_blocks(self, budget: int | None) -> int:
        """The KV pool's block count, the same on every rank (the smallest: block tables index every rank's pool
        alike); a budget too small for one sequence is an error on every rank."""
        try:
            mine = kv_cache.blocks_for(self.config, self.rank, self.block_size, self.dtype, self.max_batch_size,
                                       self.max_seq_len, budget)
        except UserError as e:
            mine = str(e)
        everyone = self.comm.all_gather_object(mine)
        errors = [e for e in everyone if isinstance(e, str)]
        if errors:
            raise UserError(errors[0])
        return min(everyone)

    def _check_memory(self, weight_bytes: int) -> None:
        """Before any weight is read: refuse, on every rank alike, when the ranks that share a host (or a GPU)
        would not fit its memory with this KV cache (runtime/footprint.py)."""
        need = (weight_bytes,
                self.num_blocks * kv_cache.block_bytes(self.config, self.rank, self.block_size, self.dtype),
                footprint.RUNTIME_BYTES if self.device.type == "cpu" else 0)
        if self.device.type == "cuda":
            where, avail = f"{socket.gethostname()}:{self.device.index}", torch.cuda.mem_get_info(self.device)[0]
        else:
            where, avail = socket.gethostname(), memory.available()
        everyone = self.comm.all_gather_object((where, need, avail))
        for host in dict.fromkeys(w for w, _, _ in everyone):  # each host in rank order, the same verdict everywhere
            here = [(r, n, a) for r, (w, n, a) in enumerate(everyone) if w == host]
            ranks = ", ".join(str(r) for r, _, _ in here)
            footprint.check_fits([n for _, n, _ in here], min(a for _, _, a in here), self.max_batch_size,
                                 self.max_seq_len, self.dtype, f"{host} (rank{'s' if len(here) > 1 else ''} {ranks})",
                                 budget=self.options.kv_cache_memory is not None)

    def _read_generation_config(self) -> dict:
        path = os.path.join(self.engine_dir, "generation_config.json")
        if not os.path.isfile(path):
            return {}
        return read_json_object(path, "fix or delete it (it only holds sampling defaults)")

    @property
    def has_tokenizer(self) -> bool:
        return any(os.path.isfile(os.path.join(self.tokenizer_dir, n))
                   for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))

    @property
    def tokenizer(self):
        """Loaded on first use, on rank 0 (the other ranks never need it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = self.tokenizer_dir
            if not self.has_tokenizer:
                raise UserError(f"no tokenizer in {path}; pass --tokenizer_dir, or give --input_ids")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as e:
                raise UserError(f"no usable tokenizer in {path} ({e}); pass --tokenizer_dir, or give --input_ids") from None
        return self._tokenizer

    # --- requests ---

    def encode(self, prompt: str, chat_template: bool | None = None) -> list[int]:
        """Token ids of a prompt; with the chat template when asked (None: when the tokenizer has one)."""
        tok = self.tokenizer
        use_template = bool(getattr(tok, "chat_template", None)) if chat_template is None else chat_template
        if use_template:
            if not getattr(tok, "chat_template", None):
                raise UserError("the tokenizer has no chat template; pass --no_prompt_template")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 chat_template: bool | None = False, max_input_length: int | None = None,
                 on_text=None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists (used verbatim).

        chat_template: apply the tokenizer's chat template to string prompts (None: if it has one).
        on_text(index, delta): streamed text, called on rank 0 only.
        Returns one RequestOutput per prompt, in order, on every rank."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        job = None
        if self.rank == 0:
            job = self._prepare(list(prompts), sampling_params, chat_template, max_input_length)
        job = self.comm.broadcast_object(job if self.rank == 0 else None)
        if isinstance(job, str):  # rank 0 found a user mistake: every rank reports it
            raise UserError(job)
        requests, texts = job
        decode = self.decode if self.rank == 0 and self.has_tokenizer else None
        completions, self.last_timings = engine_loop.generate(self.model, self.cache, self.comm, self.device,
                                                              self.eos_ids, requests, decode, on_text,
                                                              self.blocks, self.options.max_num_tokens,
                                                              self.streaming)
        results = None
        if self.rank == 0:
            results = [RequestOutput(texts[i], r.prompt_ids, c.output_ids, c.output_logprobs, c.text, c.finish_reason)
                       for i, (r, c) in enumerate(zip(requests, completions))]
        return self.comm.broadcast_object(results)

    def score(self, sequences: list[list[int]], start: int | list[int] = 1) -> list[list[float]]:
        """Natural log-probability (fp32 log-softmax) of each token of each sequence given the tokens
        before it: for sequence s, [log p(s[i] | s[:i]) for i in start..len(s)-1] (start: one value or
        one per sequence, >= 1). Rank 0's arguments are used; every rank gets the results."""
        from tp_runtime.runtime.scoring import score_batch

        job = None
        if self.rank == 0:
            try:
                job = self._check_scoring(sequences, start)
            except UserError as e:
                job = str(e)
        job = self.comm.broadcast_object(job)
        if isinstance(job, str):
            raise UserError(job)
        seqs, starts = job
        if self.rank == 0:  # scoring writes blocks 1.. as its own: no cached prefix survives it
            self.blocks = BlockManager(self.num_blocks, self.block_size, self.prefix_cache)
        longest = max(len(s) for s in seqs)
        out, B_max = [], max(1, min(self.cache.max_batch_size, self.cache.rows_that_fit(longest)))
        for i in range(0, len(seqs), B_max):
            out += score_batch(self.model, self.cache, self.comm, self.device, seqs[i : i + B_max],
                               starts[i : i + B_max])
        return self.comm.broadcast_object(out if self.rank == 0 else None)

    def score_streaming(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | the sinks and the window before it) for i = 1 .. len-1, token by token through the
        StreamingLLM cache (--streaming_window): a text of any length. Rank 0's ids are used; every rank gets
        the scores."""
        from tp_runtime.runtime.scoring import score_streaming

        if self.streaming is None:
            raise UserError("streaming scores need --streaming_window (and --sink_tokens)")
        ids = self.comm.broadcast_object([int(t) for t in ids] if self.rank == 0 else None)
        if len(ids) < 2 or any(not 0 <= t < self.config.vocab_size for t in ids):
            raise UserError(f"streaming scores need at least 2 token ids in [0, {self.config.vocab_size})")
        out = score_streaming(self.model, self.cache, self.comm, self.device, ids, self.streaming)
        return self.comm.broadcast_object(out if self.rank == 0 else None)

    def _check_scoring(self, sequences, start) -> tuple[list[list[int]], list[int]]:
        if not sequences or isinstance(sequences[0], int):
            raise UserError("score takes a non-empty list of token-id lists")
        seqs = [[int(t) for t in s] for s in sequences]
        starts = list(start) if isinstance(start, (list, tuple)) else [start] * len(seqs)
        if len(starts) != len(seqs):
            raise UserError(f"{len(starts)} start indices for {len(seqs)} sequences")
        for i, (s, k) in enumerate(zip(seqs, starts)):
            if not 1 <= k < len(s):
                raise UserError(f"sequence {i} has {len(s)} tokens; scoring from index {k} needs 1 <= start < length")
            if len(s) > self.max_seq_len:
                raise UserError(f"sequence {i} has {len(s)} tokens, more than max_seq_len {self.max_seq_len}; "
                                f"shorten it or raise --max_seq_len")
            bad = [t for t in s if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UserError(f"sequence {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): "
                                f"{bad[:5]}")
        return seqs, [int(k) for k in starts]

    def _prepare(self, prompts, sampling_params, chat_template, max_input_length):
        """Rank 0: tokenize and check. Returns (requests, texts), or an error message for all ranks."""
        try:
            if not prompts:
                raise UserError("no prompts given")
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
            if len(params) != len(prompts):
                raise UserError(f"{len(params)} sampling params for {len(prompts)} prompts")
            requests, texts = [], []
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                p = (p or SamplingParams()).resolved(self.generation_config)
                if p.stop and not self.has_tokenizer:
                    raise UserError("stop words need a tokenizer; pass --tokenizer_dir")
                if isinstance(prompt, str):
                    ids, text = self.encode(prompt, chat_template), prompt
                else:
                    ids, text = [int(t) for t in prompt], None
                self._check_ids(i, ids, p, max_input_length)
                requests.append(Request(ids, p))
                texts.append(text)
            return requests, texts
        except UserError as e:
            return str(e)

    def _check_ids(self, i: int, ids: list[int], p: SamplingParams, max_input_length: int | None) -> None:
        n = len(ids)
        if n == 0:
            raise UserError(f"prompt {i} is empty")
        if max_input_length is not None and n > max_input_length:
            raise UserError(f"prompt {i} has {n} tokens, more than --max_input_length {max_input_length}")
        if self.streaming is not None:
            if n > self.streaming.capacity:
                raise UserError(f"prompt {i} has {n} tokens, more than the {self.streaming.capacity} positions of "
                                f"--sink_tokens + --streaming_window")
        elif n + p.max_tokens > self.max_seq_len:
            raise UserError(
                f"prompt {i} has {n} tokens and asks for {p.max_tokens} more, beyond max_seq_len "
                f"{self.max_seq_len}; shorten it, lower --max_output_len, or raise --max_seq_len"
            )
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UserError(f"prompt {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")

    def woq_kernels(self) -> dict[str, str]:
        """This rank's weight-only quantized linears and the kernel each one runs: {module name: kernel}."""
        return {name: m.kernel_name for name, m in self.model.named_modules() if isinstance(m, woq.WeightOnlyLinear)}

    def kernel_summary(self) -> str:
        """'native_int4_q8x2 x 120 (1536x576, 576x1536, ...)': each kernel, how many linears, which shapes."""
        groups: dict[str, list] = {}
        for name, m in self.model.named_modules():
            if isinstance(m, woq.WeightOnlyLinear):
                groups.setdefault(m.kernel_name, []).append(f"{m.out_features}x{m.in_features}")
        return ", ".join(f"{k} x{len(v)} ({', '.join(sorted(set(v)))})" for k, v in sorted(groups.items()))

    def binding_table(self) -> list[str]:
        """How every local rank of this host is bound (the rule is deterministic, so rank 0 can tell)."""
        return [plan_binding(self.allowed_cores, self.numa_nodes, r, self.info.local_world_size, self.bind_mode,
                             self.reserve_cores, None if r != self.info.local_rank else self.threads).describe()
                for r in range(self.info.local_world_size)]

    def close(self) -> None:
        self.comm.close()
