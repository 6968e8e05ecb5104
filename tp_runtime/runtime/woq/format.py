"""A quantized linear's weight as the runtime holds it, gathered from its rank-file tensors.

The engine format (engine/format.py) stores codes, scales, zeros and an AWQ prequant factor per linear;
`collect` turns them into one `QuantWeight` when the model is built, and the kernels (kernels.py) prepare
their own layouts from it:

    y[n, o] = sum_i x[n, i] (q[o, i] - zero[o, g(i)]) scale[o, g(i)]          (x times prequant first)
    or, with a float minimum per group (GGUF's Q4_1):
    y[n, o] = sum_i x[n, i] (q[o, i] scale[o, g(i)] + minimum[o, g(i)])

int8 is per channel (scale (out, 1)) or per group (GGUF's Q8_0: scale (out, in / 32)); int4 is per group.

A SmoothQuant (W8A8) linear is an int8 one whose activations are rounded to int8 too, symmetric, one step
per token (max |x[n]| / 127) or one calibrated step for all (act_scale, static):

    y[n, o] = sx[n] scale[o] sum_i xq[n, i] q[o, i],    xq[n, i] = clamp(round(x[n, i] / sx[n]), -127, 127)
"""

from dataclasses import dataclass

import torch

from tp_runtime.engine import format as ef


@dataclass
class QuantWeight:
    """One linear's quantized weight on its device, as read from the rank file (codes unpacked)."""

    precision: str  # int8 | int4 | w8a8 (int8 codes, activations rounded to int8 too)
    q: torch.Tensor  # (out, in): int8 codes, or uint8 codes 0..15 for int4
    scale: torch.Tensor  # (out, groups) float32
    zero: torch.Tensor | None  # (out, groups) codes' zero; None: symmetric (0 for int8, 8 for int4)
    pre_scale: torch.Tensor | None = None  # (in,) multiplies the activation first (AWQ)
    kernel: str = "auto"  # the kernel asked for (auto: timed at load)
    dtype: torch.dtype = torch.float32  # compute dtype of the activations
    minimum: torch.Tensor | None = None  # (out, groups) float32: w = q * scale + minimum (zero is None then)
    act_scale: torch.Tensor | None = None  # w8a8: (1,) the static activation step; None: per token

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
        return torch.full_like(self.scale, 8.0 if self.precision == "int4" else 0.0)

    def offsets(self) -> torch.Tensor:
        """(out, groups) float32 term added to q * scale: the minimum, or -zero * scale."""
        return self.minimum.float() if self.minimum is not None else -self.zeros() * self.scale

    @property
    def per_channel(self) -> bool:
        return self.scale.shape[1] == 1

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32, prequant factor folded in: the reference every kernel must match."""
        out_f, in_f = self.q.shape
        groups = self.scale.shape[1]
        q = self.q.float().view(out_f, groups, in_f // groups)  # (out, groups, group)
        if self.minimum is not None:
            w = (q * self.scale.unsqueeze(-1) + self.minimum.float().unsqueeze(-1)).view(out_f, in_f)
        else:
            w = ((q - self.zeros().unsqueeze(-1)) * self.scale.unsqueeze(-1)).view(out_f, in_f)
        return w * self.pre_scale.float() if self.pre_scale is not None else w

    def rows(self, count: int) -> "QuantWeight":
        """The first `count` output rows (views, no copy): a probe of the layer at its real input width."""
        zero = None if self.zero is None else self.zero[:count]
        minimum = None if self.minimum is None else self.minimum[:count]
        return QuantWeight(self.precision, self.q[:count], self.scale[:count], zero, self.pre_scale, self.kernel,
                           self.dtype, minimum, self.act_scale)

    def act_grid(self, x: torch.Tensor) -> torch.Tensor:
        """x as a w8a8 kernel sees it (the reference's input): rounded to the int8 grid of its step, float32;
        x itself for the other precisions."""
        if self.precision != "w8a8":
            return x
        return fake_quant_act(x, self.act_scale)


def fake_quant_act(x: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) -> the same on the int8 grid: steps per token (max |x| / 127) or the static act_scale."""
    x = x.float()
    step = x.abs().amax(-1, keepdim=True) / 127 if act_scale is None else act_scale.float().reshape(1)
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    return torch.round(x * inv).clamp(-127, 127) * step


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
    zero = minimum = None
    if any(p.minimum is not None for p in parts):  # one with a float minimum: all of them take that form
        minimum = torch.cat([p.offsets() for p in parts])
    elif any(p.zero is not None for p in parts):
        zero = torch.cat([p.zeros().to(torch.int16) for p in parts])
    if any(p.precision == "w8a8" and not _same(p.act_scale, first.act_scale) for p in parts):
        raise ValueError("fused w8a8 weights must share their activation scale (they share their input)")
    return QuantWeight(first.precision, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                       zero, pre, first.kernel, first.dtype, minimum, first.act_scale)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or torch.equal(a, b))


def collect(weights: dict, dtype: torch.dtype, kernel: str = "auto", prefix: str = "", quantization: dict | None = None
            ) -> dict:
    """Replace each quantized linear's tensors in a rank's `weights` by one QuantWeight under `P.weight`.
    A linear is quantized when its scales are there: per_channel_scale (int8) or weights_scaling_factor
    (int4 codes packed in uint8, or int8 codes per group). Other tensors are left as they are. prefix: only the
    names under it (the model collects one layer at a time, so the unpacked codes of one layer are alive at once,
    not the model's). quantization: the engine config's; under a W8A8_SQ algorithm its int8 linears are w8a8, but
    those named in `weight_only_modules` (no smoothing fold) and lm_head."""
    sq = bool(quantization) and str(quantization.get("quant_algo") or "").startswith(ef.SQ_PREFIX)
    weight_only = set((quantization or {}).get("weight_only_modules") or ()) | {ef.LM_HEAD.removesuffix(".weight")}
    for name in [n for n in weights if n.startswith(prefix) and n.endswith((f".{ef.INT8_SCALE}", f".{ef.INT4_SCALE}"))]:
        prefix, kind = name.rsplit(".", 1)
        w = weights.pop(f"{prefix}.weight")
        scale = weights.pop(name).float()
        zero = weights.pop(f"{prefix}.{ef.ZERO}", None)
        pre = weights.pop(f"{prefix}.{ef.PREQUANT}", None)
        minimum = weights.pop(f"{prefix}.{ef.MINIMUM}", None)
        act = weights.pop(f"{prefix}.{ef.ACT_SCALE}", None)
        if kind == ef.INT4_SCALE and w.dtype == torch.int8:  # int8 per group
            qw = QuantWeight("int8", w, scale, zero, pre, kernel, dtype)
        elif kind == ef.INT8_SCALE and sq and prefix not in weight_only:
            qw = QuantWeight("w8a8", w, scale.unsqueeze(1), None, pre, kernel, dtype,
                             act_scale=None if act is None else act.float().reshape(1))
        elif kind == ef.INT8_SCALE:
            # The codes must be aligned: torch's bf16 int8 kernel crashes on a weight at an odd offset of an
            # mmap'd file; runtime/rank_file.py reads codes into fresh buffers, never mapped.
            qw = QuantWeight("int8", w, scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1), pre,
                             kernel, dtype)
        else:
            qw = QuantWeight("int4", ef.unpack_int4(w), scale, zero, pre, kernel, dtype,
                             None if minimum is None else minimum.float())
        weights[f"{prefix}.weight"] = qw
    return weights
