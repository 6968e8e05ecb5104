"""Weight-only quantized linears at run time, and the kernels that serve them.

A quantized linear's rank-file tensors (engine_format: codes, scales, zeros, AWQ prequant factor) are
gathered into one `QuantWeight` when the model is built; the parallel layers (layers.py) then run it
through a `WeightOnlyLinear`, which owns one kernel:

    y = kernel(x * prequant)            y[n, o] = sum_i x[n, i] (q[o, i] - zero[o, g(i)]) scale[o, g(i)]

Which kernel is fastest depends on the CPU, the shape and the thread count, so each layer shape is timed
once at load among the kernels that can serve it, and the winner is cached on disk
($TP_RUNTIME_CACHE or ~/.cache/tp_runtime/woq_kernels.json, keyed by CPU, torch, threads and shape).
`--woq_kernel NAME` (LLM(woq_kernel=...)) forces one for every layer of its precision.

    int8  aten_int8       torch.ops.aten._weight_int8pack_mm (CPU, CUDA): int8 weights, float activations
          aten_int8_bf16  the same fed bf16 activations from an fp32 model (its only fast CPU path)
          native_int8     tp_runtime's AVX2 kernel (csrc/woq_cpu.cpp, built on first use): fp32 activations
          fbgemm_int8     FBGEMM's dynamic linear (quantized.linear_dynamic on a prepacked per-channel
                          weight): the activation is quantized to 8 bits per call too, so it is W8A8 in
                          effect, less exact than the others (CPU); only when named, never by auto
          dequant_int8    F.linear on the codes cast to the compute dtype, then the scales (fallback)
    int4  aten_int4_cpu   torch.ops.aten._weight_int4pack_mm_for_cpu on _convert_weight_to_int4pack_for_cpu
          aten_int4_cpu_bf16  the same fed bf16 activations from an fp32 model
          native_int4     tp_runtime's AVX2 kernel (csrc/woq_cpu.cpp): fp32 activations, groups of 32k
          native_int4_q8  tp_runtime's tiled kernel: activations rounded to int8 per 32 inputs (Q8_0, as
                          llama.cpp and ONNX Runtime GenAI's CPU int4 do), 8-bit integer dots over tiles of 8
                          output rows (VNNI or AVX2); the fastest, less exact: only when named
          native_int4_q8x2  the same with each activation block as two int8 parts (~15 bits): near-exact
          aten_int4_cuda  torch.ops.aten._weight_int4pack_mm (bf16, tinygemm layout) - written, not run here
          dequant_int4    unpack, dequantize and F.linear every call (fallback; correct, slow)

Zero points: the int4 aten kernels take them as part of their (scale, zero) pairs; for int8 kernels,
which have none, y -= sum_i x[n, i] * (scale * zero)[o] is added after the matmul.
"""

import functools
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime.engine import format as ef
from tp_runtime.runtime import native
from tp_runtime.errors import UserError


@dataclass
class QuantWeight:
    """One linear's quantized weight on its device, as read from the rank file (codes unpacked)."""

    precision: str  # int8 | int4
    q: torch.Tensor  # (out, in): int8 codes, or uint8 codes 0..15 for int4
    scale: torch.Tensor  # (out, groups) float32
    zero: torch.Tensor | None  # (out, groups) codes' zero; None: symmetric (0 for int8, 8 for int4)
    pre_scale: torch.Tensor | None = None  # (in,) multiplies the activation first (AWQ)
    kernel: str = "auto"  # the kernel asked for (auto: timed at load)
    dtype: torch.dtype = torch.float32  # compute dtype of the activations

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[1]

    def zeros(self) -> torch.Tensor:
        """(out, groups) float zero of each group, implied ones included."""
        if self.zero is not None:
            return self.zero.float()
        return torch.full_like(self.scale, 0.0 if self.precision == "int8" else 8.0)

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32, prequant factor folded in: the reference every kernel must match."""
        out_f, in_f = self.q.shape
        groups = self.scale.shape[1]
        q = self.q.float().view(out_f, groups, in_f // groups)
        w = ((q - self.zeros().unsqueeze(-1)) * self.scale.unsqueeze(-1)).view(out_f, in_f)
        return w * self.pre_scale.float() if self.pre_scale is not None else w


def cat_out(parts: list):
    """Concatenate weights along their outputs (fc and gate into one matmul): tensors or QuantWeights."""
    if not isinstance(parts[0], QuantWeight):
        return torch.cat(parts)
    first = parts[0]
    if any(p.precision != first.precision or p.scale.shape[1] != first.scale.shape[1] for p in parts):
        raise ValueError("fused quantized weights must share precision and group size")
    pre = first.pre_scale
    if any((p.pre_scale is None) != (pre is None) or (pre is not None and not torch.equal(p.pre_scale, pre))
           for p in parts):
        raise ValueError("fused quantized weights must share their prequant factor (they share their input)")
    zero = None
    if any(p.zero is not None for p in parts):
        zero = torch.cat([p.zeros().to(torch.int16) for p in parts])
    return QuantWeight(first.precision, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                       zero, pre, first.kernel, first.dtype)


def collect(weights: dict, dtype: torch.dtype, kernel: str = "auto") -> dict:
    """Replace each quantized linear's tensors in a rank's `weights` by one QuantWeight under `P.weight`.
    A linear is quantized when its scales are there: per_channel_scale (int8) or weights_scaling_factor
    (int4). Other tensors are left as they are."""
    for name in [n for n in weights if n.endswith((f".{ef.INT8_SCALE}", f".{ef.INT4_SCALE}"))]:
        prefix, kind = name.rsplit(".", 1)
        w = weights.pop(f"{prefix}.weight")
        scale = weights.pop(name).float()
        zero = weights.pop(f"{prefix}.{ef.ZERO}", None)
        pre = weights.pop(f"{prefix}.{ef.PREQUANT}", None)
        if kind == ef.INT8_SCALE:
            # A fresh, aligned copy: a tensor read from the rank file may sit at any byte offset, and
            # torch's bf16 int8 kernel crashes on an unaligned weight (seen here with an mmap'd file).
            w = w.clone()
            qw = QuantWeight("int8", w, scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1), pre,
                             kernel, dtype)
        else:
            qw = QuantWeight("int4", ef.unpack_int4(w), scale, zero, pre, kernel, dtype)
        weights[f"{prefix}.weight"] = qw
    return weights


# ---------------------------------------------------------------------------
# kernels: each prepares its own copy of the weight once, then maps x (N, in) -> y (N, out)


class Kernel(nn.Module):
    """A module whose tensors are all (non-persistent) buffers, so a frozen compiled step holds them as
    constants: as plain attributes they were ~360 inputs of every SmolLM2 step, ~1 us each."""

    name = ""
    precision = ""
    auto = True  # a candidate of --woq_kernel auto (False: only when named)
    traceable = True  # torch.compile can trace it (False: the decode step stays eager)

    @staticmethod
    def supports(w: QuantWeight, dtype: torch.dtype) -> bool:
        return True

    # __init__(self, w: QuantWeight, dtype: torch.dtype): each kernel's, after nn.Module's (super().__init__())

    def __setattr__(self, name, value):
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            self.__dict__.pop(name, None)  # was None before
            self.register_buffer(name, value, persistent=False)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Int8Kernel(Kernel):
    """int8 kernels without zero points: y -= sum_i x_i * (scale * zero) after the matmul, in float32."""

    precision = "int8"

    def _zeros(self, w: QuantWeight):
        self.zero_term = None  # (out,) float32
        self.zero_col = None  # (out, 1) in the kernel's dtype: codes minus zero are exact in bf16 (|.| <= 255)
        if w.zero is not None and w.zero.any():
            self.zero_term = w.scale[:, 0] * w.zero[:, 0].float()
            self.zero_col = w.zero.float()

    def _finish(self, x, y):
        if self.zero_term is not None:
            y = y - (x.float().sum(-1, keepdim=True) * self.zero_term).to(y.dtype)
        return y


class AtenInt8(_Int8Kernel):
    name = "aten_int8"

    @staticmethod
    def supports(w, dtype):
        return w.q.device.type in ("cpu", "cuda") and hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def __init__(self, w, dtype):
        super().__init__()
        self.q = w.q.contiguous()  # (out, in) int8
        self.scale = w.scale[:, 0].to(dtype).contiguous()
        self._zeros(w)
        if self.zero_col is not None:
            self.zero_col = self.zero_col.to(dtype)

    # Beyond this many rows (prefill) the codes cast to the compute dtype and one GEMM beat the kernel, which
    # grows ~15 us a row at SmolLM2's shapes (1536x576: 780 us at 128 rows); same tensors, no copy.
    GEMM_ROWS = 16

    def forward(self, x):
        if x.shape[0] > self.GEMM_ROWS:
            w = self.q.to(x.dtype) if self.zero_col is None else self.q.to(x.dtype) - self.zero_col
            return F.linear(x, w) * self.scale
        return self._finish(x, torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale))


class FbgemmInt8(_Int8Kernel):
    """Fast, but W8A8 in effect: one 8-bit scale for the whole activation row loses SmolLM2's small channels
    beside its outliers (perplexity 12.44 -> 12.99 on CPython doc text, against 12.55 for aten_int8_bf16),
    so `auto` never picks it; --woq_kernel fbgemm_int8 trades that for speed."""

    name = "fbgemm_int8"
    auto = False
    traceable = False  # its prepacked weight is a ScriptObject that dynamo cannot put in a graph

    @staticmethod
    def supports(w, dtype):
        # With zero points the correction term cancels most of x q^T and magnifies the 8-bit activation
        # error (measured 4% of the output on random weights): symmetric weights only.
        engines = torch.backends.quantized.supported_engines
        return (w.q.device.type == "cpu" and ("fbgemm" in engines or "x86" in engines)
                and (w.zero is None or not w.zero.any()))

    def __init__(self, w, dtype):
        super().__init__()
        zeros = torch.zeros(w.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; FBGEMM still takes them
            warnings.simplefilter("ignore", UserWarning)
            qt = torch._make_per_channel_quantized_tensor(w.q.contiguous(), w.scale[:, 0].double(), zeros, 0)
        self.packed = torch.ops.quantized.linear_prepack(qt, None)
        self.dtype = dtype
        self._zeros(w)

    def forward(self, x):
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, False)
        return self._finish(x, y.to(self.dtype))


class DequantInt8(_Int8Kernel):
    name = "dequant_int8"

    def __init__(self, w, dtype):
        super().__init__()
        self.q = w.q
        self.scale = w.scale[:, 0].to(dtype)
        self._zeros(w)
        if self.zero_col is not None:
            self.zero_col = self.zero_col.to(dtype)

    def forward(self, x):
        w = self.q.to(x.dtype) if self.zero_col is None else self.q.to(x.dtype) - self.zero_col
        return F.linear(x, w) * self.scale


class NativeInt8(_Int8Kernel):
    """tp_runtime's AVX2 kernel (csrc/woq_cpu.cpp, native.py): fp32 activations, int8 codes widened to fp32
    in registers, per-channel scale after the sum; the fp32 engine's decode rows, no cast to bf16."""

    name = "native_int8"

    @staticmethod
    def supports(w, dtype):
        return w.q.device.type == "cpu" and dtype == torch.float32 and native.load()

    def __init__(self, w, dtype):
        super().__init__()
        self.q = w.q.contiguous()
        self.scale = w.scale[:, 0].float().contiguous()
        self._zeros(w)

    def forward(self, x):
        if x.shape[0] > AtenInt8.GEMM_ROWS:  # prefill: one GEMM on the codes cast to fp32 beats 4-row passes
            w = self.q.to(x.dtype) if self.zero_col is None else self.q.to(x.dtype) - self.zero_col
            return F.linear(x, w) * self.scale
        return self._finish(x, torch.ops.tp_woq.int8_mm(x.contiguous(), self.q, self.scale))


def _int4_scales_and_zeros(w: QuantWeight, dtype) -> torch.Tensor:
    """(groups, out, 2) for torch's int4 kernels, whose weight is (code - 8) * scale + zero:
    ours is (code - z) * scale, so their zero is (8 - z) * scale."""
    zero = (8.0 - w.zeros()) * w.scale  # (out, groups)
    return torch.stack([w.scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


class AtenInt4Cpu(Kernel):
    name = "aten_int4_cpu"
    precision = "int4"

    @staticmethod
    def supports(w, dtype):
        return (w.q.device.type == "cpu" and w.group_size in (32, 64, 128, 256) and w.out_features % 16 == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))  # (its packing takes rows by 16)

    def __init__(self, w, dtype):
        super().__init__()
        self.group = w.group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32).contiguous(), 2)
        self.sz = _int4_scales_and_zeros(w, dtype)

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.sz)


class NativeInt4(Kernel):
    """tp_runtime's AVX2 kernel (csrc/woq_cpu.cpp): codes unpacked and widened to fp32 in registers, each
    32 inputs' sum scaled, plus their minimum (-zero * scale) times their activation sum; fp32
    activations. Prefill rows (> GEMM_ROWS) dequantize the weight in slices of output rows for a GEMM."""

    name = "native_int4"
    precision = "int4"
    GEMM_ROWS = 16
    SLICE = 1024  # output rows dequantized at once for prefill (a 1024 x 4096 slice is 16 MB of fp32)

    @staticmethod
    def supports(w, dtype):
        return (w.q.device.type == "cpu" and dtype == torch.float32 and w.in_features % 64 == 0
                and w.group_size % 32 == 0 and native.load())

    def __init__(self, w, dtype):
        super().__init__()
        self.packed = native.pack_int4(w.q)  # (out, in / 2)
        per_half = w.group_size // 32  # the kernel takes a (scale, minimum) per 32 inputs
        self.scale = w.scale.float().repeat_interleave(per_half, dim=1).contiguous()  # (out, in / 32)
        self.minimum = (-w.zeros() * w.scale).float().repeat_interleave(per_half, dim=1).contiguous()

    def _dequantized(self, rows: slice) -> torch.Tensor:
        q = native.unpack_int4(self.packed[rows]).float()  # (out, in)
        out_f = q.shape[0]
        q = q.view(out_f, -1, 32)  # (out, in / 32, 32)
        return (q * self.scale[rows].unsqueeze(-1) + self.minimum[rows].unsqueeze(-1)).view(out_f, -1)

    def forward(self, x):
        if x.shape[0] > self.GEMM_ROWS:
            out_f = self.packed.shape[0]
            return torch.cat([F.linear(x, self._dequantized(slice(o, o + self.SLICE)))
                              for o in range(0, out_f, self.SLICE)], dim=-1)
        return torch.ops.tp_woq.int4_mm(x.contiguous(), self.packed, self.scale, self.minimum)


class NativeInt4Q8(Kernel):
    """int4 weights against the decode rows' activations rounded to int8 per 32 inputs inside the op (llama.cpp's
    Q8_0, ONNX Runtime GenAI's int4 accuracy level 4, its CPU default), in tiles of 8 output rows so that one
    8-bit integer dot instruction (VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd) serves 8 rows at once.
    Less exact than the fp32-fed kernels, so auto never picks it; prefill rows dequantize tiles for a GEMM
    (exact). Output rows are padded to a multiple of 8 (zero codes and scales) and cut off after. A float scale
    and a byte zero per group (none for symmetric weights): 20 bytes per 32 weights at group 32 instead of
    24 with a float minimum."""

    name = "native_int4_q8"
    precision = "int4"
    auto = False
    PARTS = 1  # int8 parts per activation block
    GEMM_ROWS = NativeInt4.GEMM_ROWS
    SLICE_TILES = NativeInt4.SLICE // native.TILE

    @staticmethod
    def supports(w, dtype):
        return (w.q.device.type == "cpu" and dtype == torch.float32 and w.in_features % 32 == 0
                and w.group_size % 32 == 0 and native.load())

    def __init__(self, w, dtype):
        super().__init__()
        pad = -w.out_features % native.TILE
        self.out_features, self.group = w.out_features, w.group_size
        self.tiles = native.pack_int4_tiles(F.pad(w.q, (0, 0, 0, pad)))  # (out / 8, in / 32, 128)
        self.scale = native.tile_rows(F.pad(w.scale.float(), (0, 0, 0, pad)))  # (out / 8, groups, 8)
        symmetric = w.zero is None or bool((w.zero == 8).all())
        self.zero = (torch.empty(0, dtype=torch.uint8) if symmetric  # empty: 8 everywhere, nothing to read
                     else native.tile_rows(F.pad(w.zero.to(torch.uint8), (0, 0, 0, pad), value=8)))

    def _dequantized(self, tiles: slice) -> torch.Tensor:
        q = native.unpack_int4_tiles(self.tiles[tiles]).float()  # (rows, in)
        rows, in_f = q.shape
        scale = self.scale[tiles].transpose(1, 2).reshape(rows, -1, 1)
        zero = 8.0 if self.zero.numel() == 0 else self.zero[tiles].transpose(1, 2).reshape(rows, -1, 1).float()
        return ((q.view(rows, -1, self.group) - zero) * scale).view(rows, in_f)

    def forward(self, x):
        if x.shape[0] > self.GEMM_ROWS:
            y = torch.cat([F.linear(x, self._dequantized(slice(t, t + self.SLICE_TILES)))
                           for t in range(0, self.tiles.shape[0], self.SLICE_TILES)], dim=-1)
        else:
            y = torch.ops.tp_woq.int4_mm_q8(x.contiguous(), self.tiles, self.scale, self.zero, self.PARTS)
        return y if y.shape[-1] == self.out_features else y[:, : self.out_features]


class NativeInt4Q8x2(NativeInt4Q8):
    """native_int4_q8's tiles and instructions with each 32-input block of a decode row held as two int8 parts:
    the Q8_0 codes, then the rounding error they leave rounded the same way (its step is at most 1/254 of
    the first). About 15 bits per block, finer than the bf16 activations of torch's fast CPU kernels (8
    bits), for one more integer dot per 4 inputs; so auto may pick it."""

    name = "native_int4_q8x2"
    auto = True
    PARTS = 2


class AtenInt4Cuda(Kernel):
    """tinygemm's layout (as gpt-fast packs it: input 2j in the high nibble), bf16 activations."""

    name = "aten_int4_cuda"
    precision = "int4"

    @staticmethod
    def supports(w, dtype):
        return (w.q.device.type == "cuda" and dtype == torch.bfloat16 and w.group_size in (32, 64, 128, 256)
                and w.in_features % 32 == 0)

    def __init__(self, w, dtype):
        super().__init__()
        tiles = next(t for t in (8, 4, 2) if w.in_features % (t * 16) == 0)
        q = w.q.to(torch.uint8)
        high_first = (q[:, 0::2] << 4) | q[:, 1::2]  # (out, in / 2)
        self.packed = torch.ops.aten._convert_weight_to_int4pack(high_first.contiguous(), tiles)
        self.group = w.group_size
        self.sz = _int4_scales_and_zeros(w, dtype)

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.sz)


class DequantInt4(Kernel):
    name = "dequant_int4"
    precision = "int4"

    def __init__(self, w, dtype):
        super().__init__()
        self.packed = ef.pack_int4(w.q)  # (out, in / 2)
        self.scale = w.scale.to(dtype)
        self.zero = w.zeros().to(dtype)
        self.group = w.group_size

    def forward(self, x):
        q = ef.unpack_int4(self.packed).to(x.dtype)  # (out, in)
        out_f, in_f = q.shape
        q = q.view(out_f, in_f // self.group, self.group)  # (out, groups, group)
        w = ((q - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)).view(out_f, in_f)
        return F.linear(x, w)


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_variant(base: type) -> type:
    """`base` fed bfloat16 activations from a float32 model: torch's CPU int8 / int4 kernels have a fast
    path for bf16 only (measured 10-30x faster than their fp32 path on an AVX-512 Xeon), so on CPUs with
    native bf16 an fp32 engine casts x to bf16 around them (activations rounded to bf16, W*A16)."""

    class Variant(Kernel):
        name = f"{base.name}_bf16"
        precision = base.precision

        @staticmethod
        def supports(w, dtype):
            return (dtype == torch.float32 and w.q.device.type == "cpu" and _cpu_has_bf16()
                    and base.supports(w, torch.bfloat16))

        def __init__(self, w, dtype):
            super().__init__()
            self.inner = base(w, torch.bfloat16)

        def forward(self, x):
            return self.inner(x.to(torch.bfloat16)).to(x.dtype)

    Variant.__name__ = Variant.__qualname__ = f"{base.__name__}Bf16"
    return Variant


KERNELS = {k.name: k for k in (AtenInt8, bf16_variant(AtenInt8), NativeInt8, FbgemmInt8, DequantInt8,
                               AtenInt4Cpu, bf16_variant(AtenInt4Cpu), NativeInt4, NativeInt4Q8, NativeInt4Q8x2, AtenInt4Cuda,
                               DequantInt4)}


def candidates(w: QuantWeight, dtype: torch.dtype, auto: bool = False) -> list[str]:
    """Kernels that can serve w (with auto: those `--woq_kernel auto` may pick)."""
    return [n for n, k in KERNELS.items()
            if k.precision == w.precision and k.supports(w, dtype) and (k.auto or not auto)]


# ---------------------------------------------------------------------------
# choosing: time each candidate once per shape, remember the winner


def cache_path() -> str:
    root = os.environ.get("TP_RUNTIME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tp_runtime")
    return os.path.join(root, "woq_kernels.json")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown-cpu"


def cache_key(w: QuantWeight, dtype: torch.dtype) -> str:
    dev = w.q.device
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"  # CPU: + the ISA torch dispatches to
             else f"{_cpu_name()} {torch.backends.cpu.get_cpu_capability()} x{torch.get_num_threads()}")
    names = ",".join(candidates(w, dtype, auto=True))  # a new kernel (a newer tp_runtime) times again
    return (f"{where}|torch {torch.__version__}|{w.precision} {w.out_features}x{w.in_features} "
            f"g{w.group_size} z{int(w.zero is not None)}|{str(dtype).removeprefix('torch.')}|{names}")


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


def choose(w: QuantWeight, dtype: torch.dtype) -> str:
    names = candidates(w, dtype)
    if w.kernel != "auto":
        if w.kernel not in KERNELS:
            raise UserError(f"--woq_kernel {w.kernel!r} is unknown; kernels: auto, {', '.join(KERNELS)}")
        if KERNELS[w.kernel].precision == w.precision:
            if w.kernel not in names:
                raise UserError(f"--woq_kernel {w.kernel} cannot serve a {w.precision} {w.out_features}x"
                                f"{w.in_features} weight (group {w.group_size}) on {w.q.device.type} in "
                                f"{str(dtype).removeprefix('torch.')}; it can use: {', '.join(names)}")
            return w.kernel
    names = candidates(w, dtype, auto=True)
    if len(names) == 1:
        return names[0]
    key = cache_key(w, dtype)
    if key not in _chosen:
        cached = _read_cache().get(key)
        if cached in names:
            _chosen[key] = cached
        else:
            x = torch.randn(1, w.in_features, dtype=dtype, device=w.q.device)  # decode: one token a row
            times = {n: time_kernel(KERNELS[n](w, dtype), x) for n in names}
            _chosen[key] = min(times, key=times.get)
            _write_cache(key, _chosen[key])
    return _chosen[key]


class WeightOnlyLinear(nn.Module):
    """x (..., in) -> (..., out) through the chosen kernel; no bias (the parallel layers add it)."""

    def __init__(self, w: QuantWeight):
        super().__init__()
        dtype = w.dtype
        self.kernel_name = choose(w, dtype)
        self.kernel = KERNELS[self.kernel_name](w, dtype)
        self.in_features, self.out_features = w.in_features, w.out_features
        self.register_buffer("pre_scale", w.pre_scale.to(dtype) if w.pre_scale is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale
        y = self.kernel(x.reshape(-1, self.in_features))  # (tokens, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel={self.kernel_name}"
