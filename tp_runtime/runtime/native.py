"""tp_runtime's own CPU kernels (csrc/woq_cpu.cpp: weight-only, fp32 GEMV, decode attention; csrc/w8a8_cpu.cpp:
SmoothQuant's int8 x int8 matmul): built on first use, loaded as the `tp_woq` torch ops.

The build is torch.utils.cpp_extension's (ninja + the system C++ compiler, -O3 -mavx2 -mfma -fopenmp: torch's parallel_for is OpenMP pragmas in its headers), cached in
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and keyed by the source's hash, so it costs
~30 s once per machine and nothing later; ranks building at once wait on torch's lock. Where the CPU lacks
AVX2/FMA, no compiler or ninja is found, or the build fails, `load()` returns False (with the reason in
`why_not()`) and the kernels are simply not candidates: torch's own kernels and the dequantize fallbacks
serve instead.
"""

import os
import shutil
import sys
import threading

import torch

from tp_runtime import cpu, env

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SOURCES = [os.path.join(CSRC, "woq_cpu.cpp"), os.path.join(CSRC, "w8a8_cpu.cpp")]
_lock = threading.Lock()
_reason: list = []  # why the kernels are unavailable, once load() has failed


def _ninja_on_path() -> bool:
    """torch runs `ninja --version`; the PyPI `ninja` package puts its binary beside this venv's python."""
    if shutil.which("ninja"):
        return True
    here = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(here, "ninja")):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
        return True
    return False


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the ops run only on real tensors)."""

    @torch.library.register_fake("tp_woq::int4_mm")
    def _(x, packed, scale, minimum):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("tp_woq::int4_mm_q8")
    def _(x, tiles, scale, zero, parts):
        return x.new_empty(x.shape[0], tiles.shape[0] * 8)

    @torch.library.register_fake("tp_woq::f32_mm")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("tp_woq::decode_attn")
    def _(q, cache_k, cache_v, tables, visible):
        return q.new_empty(q.shape)

    @torch.library.register_fake("tp_woq::int8_mm")
    def _(x, q, scale):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("tp_woq::w8a8_mm")
    def _(x, q, scale, act_scale):
        return x.new_empty(x.shape[0], q.shape[0])


def load() -> bool:
    """Build (first time) and load the kernels; True when torch.ops.tp_woq is ready."""
    with _lock:
        if hasattr(torch.ops, "tp_woq") and hasattr(torch.ops.tp_woq, "f32_mm"):
            return True
        if _reason:
            return False
        if not env.native_kernels():
            _reason.append("TP_RUNTIME_NATIVE=0")
        elif not cpu.has("avx2", "fma"):
            _reason.append("the CPU lacks AVX2/FMA")
        elif not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
            _reason.append("no C++ compiler (c++ / g++) on PATH")
        elif not _ninja_on_path():
            _reason.append("ninja is not installed (pip install ninja)")
        if _reason:
            return False
        from torch.utils import cpp_extension

        try:
            cpp_extension.load("tp_runtime_woq_cpu", SOURCES, extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                               extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
            _register_fakes()
            follow_isa()
        except Exception as e:  # a broken toolchain must not stop the engine: other kernels serve
            _reason.append(f"building {', '.join(map(os.path.basename, SOURCES))} failed: {str(e).strip().splitlines()[-1:]}")
            return False
        return True


def follow_isa() -> None:
    """Let int4_mm_q8 use only the dot instruction tp_runtime.cpu allows (TP_RUNTIME_ISA); load() calls it,
    and so may a caller that changed the cap since."""
    torch.ops.tp_woq.q8_isa(cpu.q8_dot())


def why_not() -> str:
    return _reason[0] if _reason else ""


def pack_int4_lanes(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in / 2) uint8 in the kernel's layout: per block of 64 inputs, 8
    little-endian uint32 lanes whose nibble k (bits 4k..4k+3) of lane j is input 8k + j. `in` must be a
    multiple of 64."""
    out_f, in_f = q.shape
    codes = q.to(torch.uint8).view(out_f, in_f // 64, 4, 2, 8)  # (out, block, byte b, nibble of the byte, lane j)
    by = codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)  # (out, block, b, j): byte b of lane j
    return by.transpose(2, 3).reshape(out_f, in_f // 2).contiguous()  # (out, block, j, b) -> little-endian lanes


def unpack_int4_lanes(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4_lanes' inverse: (out, in / 2) uint8 -> (out, in) uint8 codes."""
    out_f, half = packed.shape
    by = packed.view(out_f, half // 32, 8, 4).transpose(2, 3)  # (out, block, byte b, lane j)
    return torch.stack([by & 15, by >> 4], dim=3).reshape(out_f, half * 2)  # (out, block, b, nibble, j)


TILE = 8  # output rows per tile of pack_int4_tiles


def pack_int4_tiles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out / 8, in / 32, 128) uint8, int4_mm_q8's layout: per tile of 8 output rows
    and block of 32 inputs, 4 vectors of 32 bytes; byte 4r + j of vector v holds row r's input 4v + j in its
    low nibble and input 16 + 4v + j in its high one. out must be a multiple of 8, in of 32."""
    out_f, in_f = q.shape
    codes = q.to(torch.uint8).view(out_f // TILE, TILE, in_f // 32, 8, 4)  # (tile, row r, block, step, j)
    codes = codes.permute(0, 2, 3, 1, 4)  # (tile, block, step, r, j)
    return (codes[:, :, :4] | (codes[:, :, 4:] << 4)).reshape(out_f // TILE, in_f // 32, 128).contiguous()


def unpack_int4_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """pack_int4_tiles' inverse: (out / 8, in / 32, 128) uint8 -> (out, in) uint8 codes."""
    t, blocks, _ = tiles.shape
    by = tiles.view(t, blocks, 4, TILE, 4)  # (tile, block, vector v, r, j)
    codes = torch.cat([by & 15, by >> 4], dim=2)  # (tile, block, step, r, j)
    return codes.permute(0, 3, 1, 2, 4).reshape(t * TILE, blocks * 32)


def tile_rows(t: torch.Tensor) -> torch.Tensor:
    """(out, groups) per-row values -> (out / 8, groups, 8), the tiles' order for int4_mm_q8's scales."""
    out_f, groups = t.shape
    return t.view(out_f // TILE, TILE, groups).transpose(1, 2).contiguous()
