"""The kernels that serve weight-only quantized linears: each prepares its own copy of the weight once,
then maps x (N, in) -> y (N, out).

Which one serves a layer is select.py's choice (timed, checked against the dequantized weight).
Each kernel states its `tolerance`: the largest error it may show on select.py's probe, as a fraction
of the largest output (max |y - x W^T| / max |x W^T|, W the dequantized weight).

    int8  aten_int8       torch.ops.aten._weight_int8pack_mm (CPU, CUDA): int8 weights, float activations
          aten_int8_bf16  the same fed bf16 activations from an fp32 model (its only fast CPU path)
          native_int8     tp_runtime's AVX2 kernel (csrc/woq_cpu.cpp, built on first use): fp32 activations
          fbgemm_int8     FBGEMM's dynamic linear (quantized.linear_dynamic on a prepacked per-channel
                          weight): the activation is quantized to 8 bits per call too (7 bits without
                          AVX512-VNNI), so it is W8A8 in effect, less exact than the others (CPU); only
                          when named, never by auto
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
    w8a8  native_w8a8     SmoothQuant: x rounded to int8 (per token or static), int8 x int8 summed exactly in int32
                          (csrc/w8a8_cpu.cpp, AVX2 16-bit products); prefill through torch._int_mm (oneDNN's
                          VNNI kernel) where the CPU has VNNI and that matmul is exact
          dequant_w8a8    the same rounding in plain torch, then a float matmul on the codes (fallback)

Zero points: the int4 aten kernels take them as part of their (scale, zero) pairs; for int8 kernels,
which have none, y -= sum_i x[n, i] * (scale * zero)[o] is added after the matmul.

GGUF's forms: int8 per group of 32 (Q8_0) is served by native_int8 (a scale per 32k inputs inside its sum)
and dequant_int8; the per-channel ones refuse it. int4 with a float minimum per group (Q4_1) is served by
native_int4 (its native form), aten_int4_cpu / aten_int4_cuda (their zero is minimum + 8 * scale) and
dequant_int4; native_int4_q8 / _q8x2 hold a byte zero per group and refuse it.
"""

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime import cpu
from tp_runtime.engine import format as ef
from tp_runtime.runtime import native
from tp_runtime.runtime.woq.format import QuantWeight

class Kernel(nn.Module):
    """A module whose tensors are all (non-persistent) buffers, so a frozen compiled step holds them as
    constants: as plain attributes they would be inputs of every compiled step, each checked per call."""

    name = ""
    precision = ""
    auto = True  # a candidate of --woq_kernel auto (False: only when named)
    traceable = True  # torch.compile can trace it (False: the decode step stays eager)
    # The largest relative error allowed on the probe (select.probe) with float32 activations: fp32 kernels
    # sum in another order than the reference (~1e-6); those that round the activations state their own.
    # bf16 / fp16 compute adds HALF_TOLERANCE whatever the kernel.
    tolerance = 1e-4
    HALF_TOLERANCE = 3e-2

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
        # With zero points in bf16 / fp16 the kernel's half-precision output of x q^T is large and the zero
        # term cancels most of it: measured up to 3.4 % of the output on random weights. dequant_int8 there.
        half_with_zeros = dtype != torch.float32 and w.zero is not None and bool(w.zero.any())
        return (w.q.device.type in ("cpu", "cuda") and hasattr(torch.ops.aten, "_weight_int8pack_mm")
                and w.per_channel and not half_with_zeros)

    def __init__(self, w, dtype):
        super().__init__()
        self.q = w.q.contiguous()  # (out, in) int8
        self.scale = w.scale[:, 0].to(dtype).contiguous()
        self._zeros(w)
        if self.zero_col is not None:
            self.zero_col = self.zero_col.to(dtype)

    # Beyond this many rows (prefill) the codes cast to the compute dtype and one GEMM beat the kernel, whose
    # cost grows with every row (benchmarks/bench_woq_kernels.py); same tensors, no copy.
    GEMM_ROWS = 16

    def forward(self, x):
        if x.shape[0] > self.GEMM_ROWS:
            w = self.q.to(x.dtype) if self.zero_col is None else self.q.to(x.dtype) - self.zero_col
            return F.linear(x, w) * self.scale
        return self._finish(x, torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale))


class FbgemmInt8(_Int8Kernel):
    """Fast, but W8A8 in effect: one 8-bit scale for the whole activation row loses SmolLM2's small channels
    beside its outliers (see benchmarks/bench_quant.py), so `auto` never picks it; --woq_kernel fbgemm_int8
    trades that for speed.

    Without AVX512-VNNI, FBGEMM multiplies u8 x s8 pairs with vpmaddubsw, whose 16-bit sums saturate on
    full 8-bit activations (outputs up to 20 % off on random data): there the activations are quantized to
    7 bits (linear_dynamic's reduce_range, as PyTorch documents for x86). FBGEMM reads the CPU itself, so
    this follows the real flags, not TP_RUNTIME_ISA."""

    name = "fbgemm_int8"
    auto = False
    tolerance = 3e-2  # 7-bit activations, one scale per call: ~2 % of the largest output on random data
    traceable = False  # its prepacked weight is a ScriptObject that dynamo cannot put in a graph

    @staticmethod
    def supports(w, dtype):
        # With zero points the correction term cancels most of x q^T and magnifies the 8-bit activation
        # error (measured 4% of the output on random weights): symmetric weights only.
        engines = torch.backends.quantized.supported_engines
        return (w.q.device.type == "cpu" and ("fbgemm" in engines or "x86" in engines) and w.per_channel
                and (w.zero is None or not w.zero.any()))

    def __init__(self, w, dtype):
        super().__init__()
        zeros = torch.zeros(w.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; FBGEMM still takes them
            warnings.simplefilter("ignore", UserWarning)
            qt = torch._make_per_channel_quantized_tensor(w.q.contiguous(), w.scale[:, 0].double(), zeros, 0)
        self.packed = torch.ops.quantized.linear_prepack(qt, None)
        self.dtype = dtype
        self.reduce_range = "avx512_vnni" not in cpu.real_flags()
        self._zeros(w)

    def forward(self, x):
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range)
        return self._finish(x, y.to(self.dtype))


class DequantInt8(_Int8Kernel):
    """Per channel: F.linear on the codes (minus their zero) cast to the compute dtype, then the scales.
    Per group: the weight dequantized every call, (q - zero) * scale per group, then F.linear."""

    name = "dequant_int8"

    def __init__(self, w, dtype):
        super().__init__()
        self.q = w.q
        self.group = w.group_size
        if w.per_channel:
            self.scale = w.scale[:, 0].to(dtype)
            self._zeros(w)
            if self.zero_col is not None:
                self.zero_col = self.zero_col.to(dtype)
        else:
            self.scale = w.scale.float()  # (out, groups)
            self.zero_col = w.zeros() if w.zero is not None and w.zero.any() else None  # (out, groups)
            self.zero_term = None

    def forward(self, x):
        if self.scale.dim() == 2:
            out_f, in_f = self.q.shape
            q = self.q.float().view(out_f, in_f // self.group, self.group)  # (out, groups, group)
            if self.zero_col is not None:
                q = q - self.zero_col.unsqueeze(-1)
            return F.linear(x, (q * self.scale.unsqueeze(-1)).view(out_f, in_f).to(x.dtype))
        w = self.q.to(x.dtype) if self.zero_col is None else self.q.to(x.dtype) - self.zero_col
        return F.linear(x, w) * self.scale


class NativeInt8(_Int8Kernel):
    """tp_runtime's AVX2 kernel (csrc/woq_cpu.cpp, native.py): fp32 activations, int8 codes widened to fp32
    in registers, per-channel scale after the sum, or each group's scale after its 32k inputs' sum (GGUF's
    Q8_0, symmetric); the fp32 engine's decode rows, no cast to bf16. Prefill rows (> GEMM_ROWS) run one GEMM
    on the codes cast to fp32 (per group: dequantized in slices of output rows)."""

    name = "native_int8"
    SLICE = 1024  # output rows dequantized at once for a grouped prefill

    @staticmethod
    def supports(w, dtype):
        grouped_ok = w.per_channel or (w.group_size % 32 == 0 and (w.zero is None or not w.zero.any()))
        return w.q.device.type == "cpu" and dtype == torch.float32 and grouped_ok and native.load()

    def __init__(self, w, dtype):
        super().__init__()
        self.q = w.q.contiguous()
        self.group = w.group_size
        if w.per_channel:
            self.scale = w.scale[:, 0].float().contiguous()  # (out,)
            self._zeros(w)
        else:
            self.scale = w.scale.float().contiguous()  # (out, groups)
            self.zero_term = self.zero_col = None

    def _dequantized(self, rows: slice) -> torch.Tensor:
        q = self.q[rows].float()
        out_f, in_f = q.shape
        q = q.view(out_f, in_f // self.group, self.group)  # (out, groups, group)
        return (q * self.scale[rows].unsqueeze(-1)).view(out_f, in_f)

    def forward(self, x):
        if x.shape[0] > AtenInt8.GEMM_ROWS:  # prefill: one GEMM on the codes cast to fp32 beats 4-row passes
            if self.scale.dim() == 2:
                return torch.cat([F.linear(x, self._dequantized(slice(o, o + self.SLICE)))
                                  for o in range(0, self.q.shape[0], self.SLICE)], dim=-1)
            w = self.q.to(x.dtype) if self.zero_col is None else self.q.to(x.dtype) - self.zero_col
            return F.linear(x, w) * self.scale
        return self._finish(x, torch.ops.tp_woq.int8_mm(x.contiguous(), self.q, self.scale))


def _int4_scales_and_zeros(w: QuantWeight, dtype) -> torch.Tensor:
    """(groups, out, 2) for torch's int4 kernels, whose weight is (code - 8) * scale + zero:
    ours is (code - z) * scale, so their zero is (8 - z) * scale; or code * scale + minimum, so
    their zero is minimum + 8 * scale."""
    if w.minimum is not None:
        zero = w.minimum.float() + 8.0 * w.scale  # (out, groups)
    else:
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
        self.packed = native.pack_int4_lanes(w.q)  # (out, in / 2)
        per_half = w.group_size // 32  # the kernel takes a (scale, minimum) per 32 inputs
        self.scale = w.scale.float().repeat_interleave(per_half, dim=1).contiguous()  # (out, in / 32)
        self.minimum = w.offsets().float().repeat_interleave(per_half, dim=1).contiguous()

    def _dequantized(self, rows: slice) -> torch.Tensor:
        q = native.unpack_int4_lanes(self.packed[rows]).float()  # (out, in)
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
    tolerance = 3e-2  # activations rounded to 8 bits per 32 inputs
    PARTS = 1  # int8 parts per activation block
    GEMM_ROWS = NativeInt4.GEMM_ROWS
    SLICE_TILES = NativeInt4.SLICE // native.TILE

    @staticmethod
    def supports(w, dtype):
        return (w.q.device.type == "cpu" and dtype == torch.float32 and w.in_features % 32 == 0
                and w.group_size % 32 == 0 and w.minimum is None and native.load())  # a byte zero per group

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
    tolerance = 1e-4  # ~15 bits per block of 32 inputs: as close as the fp32 kernels on the probe


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
        self.minimum = None if w.minimum is None else w.minimum.to(dtype)  # then w = q * scale + minimum
        self.group = w.group_size

    def forward(self, x):
        q = ef.unpack_int4(self.packed).to(x.dtype)  # (out, in)
        out_f, in_f = q.shape
        q = q.view(out_f, in_f // self.group, self.group)  # (out, groups, group)
        if self.minimum is not None:
            w = (q * self.scale.unsqueeze(-1) + self.minimum.unsqueeze(-1)).view(out_f, in_f)
        else:
            w = ((q - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)).view(out_f, in_f)
        return F.linear(x, w)


def bf16_variant(base: type) -> type:
    """`base` fed bfloat16 activations from a float32 model: torch's CPU int8 / int4 kernels have a fast
    path for bf16 only (see benchmarks/bench_woq_kernels.py), so on CPUs with native bf16 an fp32 engine casts x to bf16 around them (activations rounded to bf16, W*A16)."""

    class Variant(Kernel):
        name = f"{base.name}_bf16"
        precision = base.precision
        tolerance = Kernel.HALF_TOLERANCE  # activations rounded to bf16

        @staticmethod
        def supports(w, dtype):
            return (dtype == torch.float32 and w.q.device.type == "cpu" and cpu.native_half("bfloat16")
                    and base.supports(w, torch.bfloat16))

        def __init__(self, w, dtype):
            super().__init__()
            self.inner = base(w, torch.bfloat16)

        def forward(self, x):
            return self.inner(x.to(torch.bfloat16)).to(x.dtype)

    Variant.__name__ = Variant.__qualname__ = f"{base.__name__}Bf16"
    return Variant


def quantize_act(x: torch.Tensor, act_scale: torch.Tensor | None):
    """x (N, in) -> int8 codes (N, in) and their steps (N, 1) float32: per token, or the static act_scale."""
    x = x.float()
    step = x.abs().amax(-1, keepdim=True) / 127 if act_scale is None else act_scale.expand(x.shape[0], 1)
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    return torch.round(x * inv).clamp(-127, 127).to(torch.int8), step


@functools.lru_cache(maxsize=1)
def int_mm_exact() -> bool:
    """Whether torch._int_mm sums int8 x int8 exactly here: oneDNN's AVX2 kernel multiplies u8 x s8 pairs with
    vpmaddubsw, whose 16-bit sums saturate on full-range codes (outputs off by far more than rounding)."""
    if not hasattr(torch, "_int_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (64, 16), dtype=torch.int8, generator=gen)
    a[0], b[:, 0] = 127, 127  # the pairs that saturate a 16-bit sum
    try:
        return torch.equal(torch._int_mm(a, b), a.int() @ b.int())
    except RuntimeError:
        return False


class NativeW8A8(Kernel):
    """SmoothQuant's W8A8 matmul: y = sx[n] scale[o] sum_i xq[n, i] q[o, i] (format.py), the integer sums exact.
    Decode rows through tp_woq::w8a8_mm (AVX2, 16-bit products); prefill rows through torch._int_mm where the
    CPU has VNNI (as tp_runtime.cpu sees it) and int_mm_exact() holds, else the same native kernel."""

    name = "native_w8a8"
    precision = "w8a8"
    GEMM_ROWS = 16

    @staticmethod
    def supports(w, dtype):
        return w.q.device.type == "cpu" and native.load()

    def __init__(self, w, dtype):
        super().__init__()
        self.q = F.pad(w.q, (0, -w.in_features % 16)).contiguous()  # (out, in padded to 16)
        self.scale = w.scale[:, 0].float().contiguous()
        self.act_scale = w.act_scale.float().reshape(1) if w.act_scale is not None else torch.empty(0)
        self.dtype = dtype
        self.use_int_mm = (cpu.has("avx512_vnni") or cpu.has("avx_vnni")) and int_mm_exact()
        if self.use_int_mm:
            self.qt = w.q.t()  # (in, out) view of the (out, in) codes: oneDNN's fast layout

    def forward(self, x):
        if self.use_int_mm and x.shape[0] > self.GEMM_ROWS:
            xq, step = quantize_act(x, self.act_scale if self.act_scale.numel() else None)
            y = torch._int_mm(xq, self.qt).float() * step * self.scale
        else:
            y = torch.ops.tp_woq.w8a8_mm(x.float().contiguous(), self.q, self.scale, self.act_scale)
        return y.to(self.dtype)


class DequantW8A8(Kernel):
    name = "dequant_w8a8"
    precision = "w8a8"

    def __init__(self, w, dtype):
        super().__init__()
        self.q = w.q
        self.scale = w.scale[:, 0].float()
        self.act_scale = w.act_scale
        self.dtype = dtype

    def forward(self, x):
        xq, step = quantize_act(x, self.act_scale)
        return (F.linear(xq.float(), self.q.float()) * step * self.scale).to(self.dtype)


KERNELS = {k.name: k for k in (AtenInt8, bf16_variant(AtenInt8), NativeInt8, FbgemmInt8, DequantInt8,
                               AtenInt4Cpu, bf16_variant(AtenInt4Cpu), NativeInt4, NativeInt4Q8, NativeInt4Q8x2, AtenInt4Cuda,
                               DequantInt4, NativeW8A8, DequantW8A8)}


def candidates(w: QuantWeight, dtype: torch.dtype, auto: bool = False) -> list[str]:
    """Kernels that can serve w (with auto: those `--woq_kernel auto` may pick)."""
    return [n for n, k in KERNELS.items()
            if k.precision == w.precision and k.supports(w, dtype) and (k.auto or not auto)]


