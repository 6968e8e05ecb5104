"""What this CPU can do, as every part of tp_runtime sees it: one reader of /proc/cpuinfo, one ISA cap.

`TP_RUNTIME_ISA` caps the instruction sets tp_runtime treats as present, so the paths of a smaller CPU run
(and are tested) on a bigger one:

    avx2         AVX2 + FMA only (AMD Zen 2/3): no VNNI, no native bf16
    avx_vnni     + AVX-VNNI (256-bit vpdpbusd; Alder Lake and later cores)
    avx512       + AVX-512 F/BW/VL/DQ (Skylake-SP): no VNNI, no bf16
    avx512_vnni  + AVX512-VNNI (Cascade Lake)
    avx512_bf16  + AVX512-BF16 (Cooper Lake, Zen 4/5): bf16 compute is native from here
    amx          everything the CPU has (Sapphire Rapids and later: AMX tiles)

The cap reaches three places: tp_runtime's own decisions (bf16 vs fp32 compute, the *_bf16 kernels,
the native kernels' dot instruction), PyTorch's ATen kernels (ATEN_CPU_CAPABILITY) and oneDNN
(ONEDNN_MAX_CPU_ISA). The last two are read once, when torch is imported, so `import tp_runtime` sets them
from the cap before it imports torch (the console scripts and the test suite import it first). FBGEMM
picks its kernels from the CPU itself and cannot be capped: its int8 kernel decides from the real flags.
A cap never adds what the CPU lacks.

No torch import here: this module runs before torch is loaded.
"""

import functools
import os
import warnings

from tp_runtime import env
from tp_runtime.errors import UserError

ENV = "TP_RUNTIME_ISA"
LEVELS = ("avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16", "amx")
# The flags above AVX2 that a cap may hide; any other flag (sse, avx, avx2, fma, f16c, ...) is never hidden.
_AVX512_EXTRAS = {"avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vnni"}
_TORCH = {"avx2": "avx2", "avx_vnni": "avx2", "avx512": "avx512", "avx512_vnni": "avx512",
          "avx512_bf16": "avx512", "amx": None}
_ONEDNN = {"avx2": "AVX2", "avx_vnni": "AVX2_VNNI", "avx512": "AVX512_CORE", "avx512_vnni": "AVX512_CORE_VNNI",
           "avx512_bf16": "AVX512_CORE_BF16", "amx": None}


def _hideable(flag: str) -> bool:
    return flag.startswith(("avx512", "amx", "avx_vnni", "avx_ifma", "avx_ne_convert"))


def _allowed(flag: str, level: str) -> bool:
    """Whether `flag` (one that a cap may hide) is kept under the cap `level`."""
    rank = LEVELS.index(level)
    if level == "amx":
        return True
    if flag.startswith("avx_vnni"):
        return level == "avx_vnni"
    if flag.startswith("avx512"):
        if flag in ("avx512_vnni", "avx512vnni"):
            return rank >= LEVELS.index("avx512_vnni")
        if flag == "avx512_bf16":
            return rank >= LEVELS.index("avx512_bf16")
        if flag in _AVX512_EXTRAS:  # avx512_fp16: Sapphire Rapids, only uncapped
            return False
        return rank >= LEVELS.index("avx512")
    return False  # amx_*, avx_ifma, avx_ne_convert: AMX-era parts, only uncapped


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    name, flags = "unknown-cpu", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown-cpu":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if flags and name != "unknown-cpu":
                    break
    except OSError:
        pass
    return name, flags


def model_name() -> str:
    return _cpuinfo()[0]


def real_flags() -> frozenset:
    """The flags /proc/cpuinfo lists, whatever the cap."""
    return _cpuinfo()[1]


def cap() -> str | None:
    """The ISA cap asked for in TP_RUNTIME_ISA, or None. An unknown value is an error that names the choices."""
    value = env.isa_cap()
    if not value:
        return None
    if value not in LEVELS:
        raise UserError(f"{ENV}={value!r} is not one of {', '.join(LEVELS)}")
    return value


def flags() -> frozenset:
    """The CPU's flags less those above the cap: what every kernel choice of tp_runtime reads."""
    level, real = cap(), real_flags()
    if level is None:
        return real
    return frozenset(f for f in real if not _hideable(f) or _allowed(f, level))


def has(*names: str) -> bool:
    return set(names) <= flags()


def native_half(dtype_name: str) -> bool:
    """Whether the CPU computes `bfloat16` / `float16` natively (else those matmuls run ~100x slower than fp32
    through conversions, and tp_runtime computes in float32)."""
    wanted = {"bfloat16": {"avx512_bf16", "amx_bf16"}, "float16": {"avx512_fp16", "amx_fp16"}}[dtype_name]
    return bool(flags() & wanted)


def q8_dot() -> int:
    """The 8-bit dot instruction the native int4 x int8 tiles may use: 2 AVX-VNNI, 1 AVX512-VNNI (with VL),
    0 AVX2's vpmaddubsw + vpmaddwd (the codes of csrc/woq_cpu.cpp's tp_woq::q8_isa)."""
    f = flags()
    if "avx_vnni" in f:
        return 2
    if {"avx512_vnni", "avx512vl"} <= f:
        return 1
    return 0


def tag() -> str:
    """The flags that decide which kernel path runs, for cache keys and benchmark records."""
    f = flags()
    shown = [x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                         "amx_tile", "amx_int8", "amx_bf16") if x in f]
    return " ".join(shown) + (f" (capped: {cap()})" if cap() else "")


def describe() -> str:
    """One line for warnings and errors: the CPU's name and the flags that matter."""
    return f"{model_name()} [{tag() or 'no AVX2'}]"


def levels_available() -> list[str]:
    """The caps this CPU can serve (each one's paths can be exercised here), smallest first."""
    real = real_flags()
    out = []
    if {"avx2", "fma"} <= real:
        out.append("avx2")
    if "avx_vnni" in real:
        out.append("avx_vnni")
    if {"avx512f", "avx512bw", "avx512vl"} <= real:
        out.append("avx512")
        if "avx512_vnni" in real:
            out.append("avx512_vnni")
        if "avx512_bf16" in real:
            out.append("avx512_bf16")
    if "amx_tile" in real:
        out.append("amx")
    return out


def apply_to_environment(environ=os.environ) -> None:
    """Set PyTorch's and oneDNN's own caps from TP_RUNTIME_ISA, unless already set. Both are read when torch
    is imported: if it already is, only tp_runtime's own decisions follow the cap, and a warning says so."""
    try:
        level = cap()
    except UserError:  # reported where the cap is first consulted, inside a command's error handling
        return
    if level is None:
        return
    wanted = {"ATEN_CPU_CAPABILITY": _TORCH[level], "ONEDNN_MAX_CPU_ISA": _ONEDNN[level]}
    late = []
    for var, value in wanted.items():
        if value is None or var in environ:
            continue
        environ[var] = value
        late.append(var)
    import sys

    if late and "torch" in sys.modules:
        warnings.warn(f"{ENV}={level}: torch was imported before tp_runtime, so {', '.join(late)} "
                      "cannot cap its kernels in this process (tp_runtime's own choices still follow the cap)",
                      stacklevel=3)
