"""The compiled decode step: torch.compile of a model's decode body, called the fastest way this torch allows.

One entry point, `compile_decode(model, cache, max_batch, path)`, returns a `CompiledDecode` that the model
calls for every decode step (TPDecoder.forward). It is Inductor's code (a C++ wrapper on CPU, so no Python
runs between its kernels) for two graphs, batch 1 and batch >= 2, each serving every attention span
(dynamic shapes), built and run once at load, so no rank recompiles mid-generation while the others wait in
a collective. The collectives are custom ops inside the graph (distributed/comm.py).

How a step reaches the compiled graph, fastest first (`path`; auto takes the fastest that works here):

    direct   Dynamo's bytecode for the step's graph, chosen by batch size and called straight: no frame
             handling, no guards. Read through a private API (torch._C._dynamo.eval_frame
             ._debug_get_cache_entry_list), kept only if it gives the compiled function's output on the
             dummy step; any failure falls back to `stance`.
    stance   the compiled function with Dynamo's guard evaluation skipped after load
             (torch.compiler.set_stance(skip_guard_eval_unsafe=True), torch >= 2.6): the weights and caches
             never change shape, dtype or device after load.
    guarded  the compiled function as torch.compile returns it, every guard checked on every call.

Freezing (Inductor's `freezing`): the weights become constants of the compiled code instead of graph inputs
passed and checked on every call; `freeze=False` keeps them inputs.
Private torch APIs are each used behind a check of what this torch has, with the next path as fallback;
pyproject allows torch 2.5 to 2.14. benchmarks/bench_cpu_tp.py measures each path's cost per token.
"""

import itertools
import json
import os
import sys
import tempfile
import time
import types

import torch

from tp_runtime import cpu, env
from tp_runtime.errors import UserError

PATHS = ("auto", "direct", "stance", "guarded")
# The attention span the dummy steps trace with: Dynamo gives equal sizes one symbol (duck shaping), and a
# later call where they differ recompiles, so it is none of the batch sizes traced (1, 2).
COMPILE_SPAN = 3
COMPILE_TABLE_WIDTH = 5  # the block tables' width when tracing: not 0/1 (specialized), nor a batch size or the span
_bodies = itertools.count()
# What a compiled decode step saves per step against the eager one is of the order of the Python overhead of
# an eager step's layers (benchmarks/bench_cpu_tp.py compares them); this conservative figure decides only
# whether a one-shot run with a known number of decode steps compiles under --compile auto.
STEP_SAVING_S = 0.01
FIRST_COMPILE_GUESS_S = 120.0  # when this machine never compiled this engine: a cold Inductor cache on 2 cores


def has_stance() -> bool:
    return hasattr(torch.compiler, "set_stance")  # torch >= 2.6


def has_direct() -> bool:
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list  # noqa: F401
    except ImportError:
        return False
    return True


def _own_code(fn):
    """`fn` through a code object of its own. Dynamo keeps its graphs and guards per code object: shared by
    every model of a process, one model's graphs were tried against another's weights (several engines of
    different layouts in one process: KeyError 'weight' inside Dynamo's guards, once their evaluation was
    cut down after load)."""
    name = f"{fn.__name__}_{next(_bodies)}"
    code = fn.__code__
    code = code.replace(co_name=name, co_qualname=name) if sys.version_info >= (3, 11) else code.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__)


class CompiledDecode:
    """A model's compiled decode body. Call it with the body's arguments (TPDecoder._decode_args)."""

    def __init__(self, model, body, path: str, seconds: float, graphs: dict, compiled):
        self.model, self.body, self.path, self.seconds = model, body, path, seconds
        self.graphs = graphs  # 1 (batch 1), 2 (batch >= 2) -> Dynamo's bytecode (path direct)
        self.compiled = compiled

    def __call__(self, *args):
        if self.path == "direct":
            return self.graphs[min(args[0].shape[0], 2)](self.model, *args)
        if self.path == "stance":
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.compiled(*args)
        return self.compiled(*args)


def _direct_graph(compiled, body, want: torch.Tensor, model, args: tuple):
    """Dynamo's bytecode for the graph it built last for `compiled`, as a function of the body's arguments
    (the model first), if it gives `want` on `args`; else None (this torch does not expose it, or runs it
    differently)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        code = compiled._torchdynamo_orig_callable.__func__.__code__
        graph = types.FunctionType(_debug_get_cache_entry_list(code)[0].code, body.__globals__)
        return graph if torch.equal(graph(model, *args), want) else None
    except Exception:  # any failure only costs the faster path
        return None


def key_cache_by_isa() -> str | None:
    """Give Inductor one on-disk cache directory per vector ISA it generates C++ for; returns that directory.

    Inductor's FX-graph cache key (torch 2.13) leaves out that ISA, which ATEN_CPU_CAPABILITY (TP_RUNTIME_ISA's
    cap) or another CPU sharing the directory changes: a graph generated for AVX2 (8 floats a vector) was then
    rebuilt with AVX-512's flags (16), and its stores ran 8 floats past each KV-cache row, corrupting the cache.
    A directory the user named (TORCHINDUCTOR_CACHE_DIR) is kept as the parent."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # an older torch: its cache stays as it is
        return None
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    if os.path.basename(base).startswith("isa-"):  # set by this function in a parent process
        base = os.path.dirname(base)
    isa = str(pick_vec_isa()).replace(" ", "+") or "none"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path = os.path.join(base, f"isa-{isa}")
    return path


def compile_decode(model, cache, max_batch: int = 1, path: str = "auto", freeze: bool = True) -> CompiledDecode:
    """Compile `model`'s decode body (TPDecoder._decode_body) for batch 1 and, with max_batch > 1, for larger
    batches, run each once on dummy tokens (at position COMPILE_SPAN - 1, their keys and values written into
    block 0, which no sequence reads), and pick the call path. Inductor caches its generated code on disk (TORCHINDUCTOR_CACHE_DIR),
    so a later run of the same engine skips most of the compile."""
    import torch._inductor.config as inductor_config

    if path not in PATHS:
        raise UserError(f"the compile path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "stance" and not has_stance():
        raise UserError(f"the stance path needs torch >= 2.6 (torch.compiler.set_stance); this is {torch.__version__}")
    if path == "direct" and not has_direct():
        raise UserError(f"torch {torch.__version__} does not expose Dynamo's bytecode as the direct path needs; "
                        "use the auto compile path")
    if cache.max_seq_len < COMPILE_SPAN:
        raise UserError(f"--compile on needs --max_seq_len >= {COMPILE_SPAN}, got {cache.max_seq_len}")
    t0 = time.perf_counter()
    dev = model.embedding.weight.device
    if dev.type == "cpu":
        key_cache_by_isa()
    # Symbols only for the batch and the attention span: the caches' sizes are fixed (a symbol per cache size
    # made tracing minutes long), and so are the quantized kernels' tensors (a width equal to the traced span
    # would be duck-shaped to it and recompile at the next span).
    for t in (*cache.k, *cache.v):
        torch._dynamo.mark_static(t)
    for m in model.modules():
        kernel = getattr(m, "kernel", None)
        if isinstance(kernel, torch.nn.Module):
            for t in kernel.buffers():
                torch._dynamo.mark_static(t)
    body = _own_code(type(model)._decode_body)
    compiled = torch.compile(types.MethodType(body, model), dynamic=True, fullgraph=True)
    # Inductor's flags are global: set only while the graphs are traced and compiled (here, at their first
    # call). Dynamo reads `freezing` too (a weight becomes a graph constant rather than an input only then).
    flags = {"freezing": freeze}
    if dev.type == "cpu":
        flags["cpp_wrapper"] = True
    graphs, want = {}, {}
    with torch.inference_mode(), inductor_config.patch(**flags):
        for B in sorted({1, max_batch}):
            ids = torch.ones(B, 1, dtype=torch.long, device=dev)
            positions = torch.full((B, 1), COMPILE_SPAN - 1, dtype=torch.long, device=dev)  # not `ids`: no aliasing
            last = torch.zeros(B, dtype=torch.long, device=dev)
            tables = cache.trash_tables(B, COMPILE_TABLE_WIDTH, dev)  # every write into block 0
            args = model._decode_args(ids, positions, cache, last, tables)
            want[min(B, 2)] = out = compiled(*args)
            if path in ("auto", "direct"):
                graphs[min(B, 2)] = _direct_graph(compiled, body, out, model, args)
    chosen = path
    if path in ("auto", "direct"):
        chosen = "direct" if all(g is not None for g in graphs.values()) else None
        if chosen is None and path == "direct":
            raise UserError(f"Dynamo's bytecode did not give the compiled step's output under torch "
                            f"{torch.__version__}; use the auto compile path")
    if chosen is None:
        chosen = "stance" if has_stance() else "guarded"
    return CompiledDecode(model, body, chosen, time.perf_counter() - t0, graphs if chosen == "direct" else {},
                          compiled)


# ---------------------------------------------------------------------------
# whether compiling pays back, from how long it took last time


def _times_path() -> str:
    root = env.cache_dir()
    return os.path.join(root, "compile_times.json")


def compile_key(cfg, threads: int, dtype: torch.dtype, max_batch: int) -> str:
    """What decides a compile's cost here: the engine's layout, the machine, torch, threads and batch."""
    layout = {k: getattr(cfg, k, None) for k in ("source_architecture", "num_hidden_layers", "hidden_size",
                                                  "intermediate_size", "tp_size", "vocab_size")}
    return (f"{json.dumps(layout, sort_keys=True)}|{json.dumps(cfg.quantization, sort_keys=True, default=str)}|"
            f"{str(dtype).removeprefix('torch.')}|b{max_batch}|x{threads}|{cpu.model_name()} [{cpu.tag()}]|"
            f"torch {torch.__version__}")


def _read_times() -> dict:
    try:
        with open(_times_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def last_compile_s(key: str) -> float | None:
    value = _read_times().get(key)
    return float(value) if isinstance(value, (int, float)) else None


def remember_compile_s(key: str, seconds: float) -> None:
    path = _times_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_times()
        data[key] = round(seconds, 1)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".compile-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: ranks writing at once never leave a torn file
    except OSError:
        pass


def pays_back(decode_steps: int | None, last_s: float | None) -> bool:
    """Whether a run of `decode_steps` decode steps (None: a long-lived engine, a server or the Python API)
    gains more from the compiled step than the compile costs, judged by the last compile here."""
    if decode_steps is None:
        return True
    expected = last_s if last_s is not None else FIRST_COMPILE_GUESS_S
    return decode_steps * STEP_SAVING_S >= expected
