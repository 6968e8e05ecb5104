"""Which kernel serves each quantized layer: checked first, then timed, then remembered.

For every layer shape (precision, out x in, group, zero points, compute dtype) the kernels that can serve
it are first run on a probe: the layer's first PROBE_ROWS output rows at their real input width, against
the dequantized weight (QuantWeight.dequantize), for a decode row and a prefill batch. A kernel off by
more than its documented tolerance (kernels.py) is dropped with a one-line warning naming it and the CPU:
on CPUs the suite was never run on, a fast kernel can be wrong, and no timing may pick it. The survivors
are timed once (time_kernel), and the winner is cached on disk ($TP_RUNTIME_CACHE or
~/.cache/tp_runtime/woq_kernels.json) under a key of CPU model, the flags that decide the kernels' paths
(tp_runtime.cpu.tag, TP_RUNTIME_ISA included), torch's CPU capability, threads, shape and candidates.
A cached winner is probed again before use. `--woq_kernel NAME` names one kernel for every layer of its
precision; it is probed too, and one that fails is an error.
"""

import functools
import json
import os
import tempfile
import time
import warnings

import torch

from tp_runtime import cpu, env
from tp_runtime.errors import UserError
from tp_runtime.runtime.woq.format import QuantWeight
from tp_runtime.runtime.woq.kernels import KERNELS, Kernel, candidates

PROBE_ROWS = 64  # output rows of a layer the probe runs (a slice: no memory at 20B)


def cache_path() -> str:
    root = env.cache_dir()
    return os.path.join(root, "woq_kernels.json")


def _where(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu.model_name()} [{cpu.tag()}] {torch.backends.cpu.get_cpu_capability()} x{torch.get_num_threads()}"


def cache_key(w: QuantWeight, dtype: torch.dtype) -> str:
    names = ",".join(candidates(w, dtype, auto=True))  # a new kernel (a newer tp_runtime) times again
    return (f"{_where(w.q.device)}|torch {torch.__version__}|{w.precision} {w.out_features}x{w.in_features} "
            f"g{w.group_size} z{int(w.zero is not None)}{' min' if w.minimum is not None else ''}|"
            f"{str(dtype).removeprefix('torch.')}|{names}")


def tolerance(name: str, dtype: torch.dtype) -> float:
    tol = KERNELS[name].tolerance
    return max(tol, Kernel.HALF_TOLERANCE) if dtype in (torch.bfloat16, torch.float16) else tol


def probe(name: str, w: QuantWeight, dtype: torch.dtype) -> float:
    """max |y - ref| / max |ref| of kernel `name` on the first PROBE_ROWS rows of w, over one decode row and a
    prefill batch (different data per row); ref in float32 from the dequantized weight and the activations
    as the kernel is fed them (rounded to the compute dtype)."""
    part = w.rows(min(PROBE_ROWS, w.out_features))
    kernel = KERNELS[name](part, dtype)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for rows in (1, 24):  # 24: beyond every kernel's GEMM_ROWS, the prefill path
        x = torch.randn(rows, w.in_features, generator=gen).to(dtype).float().to(w.q.device)  # as fed, rounded
        xin = x if part.pre_scale is None else x * part.pre_scale.to(x.device)
        if part.precision == "w8a8":  # the activations on the kernel's int8 grid (prequant folded in after)
            xin = part.act_grid(xin)
            x = xin if part.pre_scale is None else xin / part.pre_scale.to(x.device)
        ref = x @ part.dequantize().t().to(x.device)
        y = kernel(xin.to(dtype)).float()
        err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err if err == err else float("inf"))  # NaN counts as off
    return worst


_probed: dict = {}  # in-process: (cache key, kernel name) -> error


def _checked(names: list[str], w: QuantWeight, dtype: torch.dtype, key: str) -> list[str]:
    """The kernels among `names` within their tolerance on the probe; a warning for each one dropped."""
    kept = []
    for name in names:
        if (key, name) not in _probed:
            _probed[key, name] = probe(name, w, dtype)
        err = _probed[key, name]
        if err <= tolerance(name, dtype):
            kept.append(name)
        else:
            warnings.warn(f"woq kernel {name} dropped: {err:.3g} off the dequantized matmul (tolerance "
                          f"{tolerance(name, dtype):.3g}) on {_where(w.q.device)}", RuntimeWarning, stacklevel=3)
    return kept


def _read_cache() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(key: str, name: str) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache()
        data[key] = name
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".woq-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: ranks writing at once never leave a torn file
    except OSError:
        pass  # a read-only home: time again next load


def _last_level_cache_bytes() -> int:
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
            return int(text[:-1]) * {"K": 1024, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
        except (OSError, ValueError):
            continue
    return 32 << 20


@functools.lru_cache(maxsize=1)
def _eviction_buffer() -> torch.Tensor:
    """Twice the last-level cache of float32 (capped at 256 MB): reading it evicts a weight from the caches."""
    return torch.ones(min(2 * _last_level_cache_bytes(), 256 << 20) // 4)


def time_kernel(kernel: Kernel, x: torch.Tensor, calls: int = 20) -> float:
    """Seconds per call. CUDA: best of 3 rounds of back-to-back calls. CPU: the median of single calls, each
    after evicting the caches, because a decode step streams every weight from memory (a model is larger
    than the caches): timed on a cached weight, torch's bf16 kernels won here where the runtime's lost in the
    whole step (int8 SmolLM2: 128 vs 136 tok/s)."""
    if x.device.type == "cuda":
        for _ in range(3):
            kernel(x)
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                kernel(x)
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / calls)
        return best
    scratch = _eviction_buffer()
    for _ in range(3):
        kernel(x)
    times = []
    for _ in range(calls):
        scratch.sum()
        t0 = time.perf_counter()
        kernel(x)
        times.append(time.perf_counter() - t0)
    return sorted(times)[calls // 2]


_chosen: dict = {}  # in-process: cache key -> kernel name


def _named(w: QuantWeight, dtype: torch.dtype) -> str | None:
    """The kernel named by --woq_kernel when it applies to w (None: choose), checked."""
    if w.kernel == "auto":
        return None
    if w.kernel not in KERNELS:
        raise UserError(f"--woq_kernel {w.kernel!r} is unknown; kernels: auto, {', '.join(KERNELS)}")
    if KERNELS[w.kernel].precision != w.precision:
        return None  # a kernel of the other precision: this weight chooses its own
    names = candidates(w, dtype)
    shape = (f"a {w.precision} {w.out_features}x{w.in_features} weight (group {w.group_size}) on "
             f"{w.q.device.type} in {str(dtype).removeprefix('torch.')}")
    if w.kernel not in names:
        raise UserError(f"--woq_kernel {w.kernel} cannot serve {shape}; it can use: {', '.join(names)}")
    if not _checked([w.kernel], w, dtype, cache_key(w, dtype)):
        err = _probed[cache_key(w, dtype), w.kernel]
        raise UserError(f"--woq_kernel {w.kernel} is {err:.3g} off the dequantized matmul for {shape} on "
                        f"{_where(w.q.device)} (tolerance {tolerance(w.kernel, dtype):.3g}); use auto or one "
                        f"of: {', '.join(n for n in names if n != w.kernel)}")
    return w.kernel


def choose(w: QuantWeight, dtype: torch.dtype) -> str:
    """The kernel for w: the named one, else the fastest of those auto may pick that pass the probe."""
    named = _named(w, dtype)
    if named:
        return named
    key = cache_key(w, dtype)
    if key in _chosen:
        return _chosen[key]
    names = candidates(w, dtype, auto=True)
    cached = _read_cache().get(key)
    if cached in names and _checked([cached], w, dtype, key):
        _chosen[key] = cached
        return cached
    names = _checked(names, w, dtype, key)
    if not names:
        raise UserError(f"no weight-only kernel computes a {w.precision} {w.out_features}x{w.in_features} weight "
                        f"within its tolerance on {_where(w.q.device)}")
    if len(names) == 1:
        _chosen[key] = names[0]
        return names[0]
    x = torch.randn(1, w.in_features, dtype=dtype, device=w.q.device)  # decode: one token a row
    times = {n: time_kernel(KERNELS[n](w, dtype), x) for n in names}
    _chosen[key] = min(times, key=times.get)
    _write_cache(key, _chosen[key])
    return _chosen[key]
