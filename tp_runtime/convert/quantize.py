"""Weight-only quantization at conversion: round-to-nearest int8 / int4, per channel or per group.

Pure functions of tensors (they run on meta tensors too, so planning an engine needs no data).
A weight W (out, in) becomes integer codes q (out, in), a scale per (row, group of inputs) and,
with --zero_point, an integer zero per (row, group):

    W[o, i] ~= (q[o, i] - zero[o, i // group]) * scale[o, i // group]

    int8  codes -128..127, per channel (group = in), zero 0 unless --zero_point   TensorRT-LLM's W8A16
    int4  codes 0..15, per group of `group` inputs (or per channel with -1), zero 8 unless --zero_point
          (W4A16; W4A16_AWQ / W4A16_GPTQ for AWQ-searched or pre-quantized weights)

Symmetric int4 follows llama.cpp's Q4_0 rounding: the group's value of largest magnitude m maps to
code 0, so the scale is m / -8 (its sign is m's) and all 16 codes are used.

Imported GGUF blocks (convert/gguf.py) add two forms, never produced by rounding here:
    int8 per group of 32 (Q8_0)           W[o, i] = q[o, i] * scale[o, i // 32]
    int4 with a float minimum (Q4_1)      W[o, i] = q[o, i] * scale[o, i // 32] + minimum[o, i // 32]

Engine tensors of a quantized linear `P` (TensorRT-LLM's names, layout (out, in) as the weight's):
    P.weight                    int8 (out, in) | uint8 (out, in / 2): two int4 codes a byte, even input low
    P.per_channel_scale         float32 (out,)            int8 per channel
    P.weights_scaling_factor    float32 (out, in / group)  int4, or int8 per group
    P.zero                      int8 (out,) | uint8 (out, in / group), only with zero points
    P.minimum                   float32 (out, in / group), only with a float minimum (no zero then)
    P.prequant_scaling_factor   float32 (in,), AWQ only, where its scale could not be folded: x * f first
    P.act_scale                 float32 (1,), SmoothQuant without --per_token: the activations' static int8 step

Sharding (DESIGN "Quantized weights"): codes, scales and zeros are cut with the weight's own slices
(rows for column / qkv / vocab; input columns for row-parallel, in whole groups), a prequant factor
with the input columns. Row-parallel int4 therefore needs each rank's input slice in whole groups.
"""

from dataclasses import dataclass, field

import torch

from tp_runtime.convert import partition as pt
from tp_runtime.engine.format import pack_int4, unpack_int4
from tp_runtime.errors import UserError

PRECISIONS = ("int8", "int4")
ALGOS = ("rtn", "awq")  # weight-only; SmoothQuant (algo "sq", W8A8) comes from --smoothquant (smoothquant.py)
GROUP_SIZES = (32, 64, 128)
# The linears that are quantized (the attention and MLP matrices); lm_head only when asked.
QUANTIZED_SUFFIXES = ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight", "mlp.gate.weight",
                      "mlp.proj.weight")
LM_HEAD = "lm_head.weight"
# SmoothQuant's TensorRT-LLM QuantAlgo names by (weight steps per channel, activation steps per token)
SQ_ALGOS = {(True, True): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", (True, False): "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
            (False, True): "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", (False, False): "W8A8_SQ_PER_TENSOR_PLUGIN"}


@dataclass(frozen=True)
class QuantScheme:
    precision: str  # int8 | int4
    group_size: int  # -1: per channel
    zero_point: bool = False
    algo: str = "rtn"  # rtn | awq | gptq (read pre-quantized)
    quantize_lm_head: bool = False
    lm_head_precision: str = "int8"  # with quantize_lm_head: int8 per channel, or int4 in the layers' groups
    prequantized: bool = False  # read as they are from an AWQ / GPTQ checkpoint (prequantized.py) or a GGUF
    awq: object = field(default=None, compare=False, repr=False)  # awq.AwqResult once searched (or SmoothQuant's)
    # --use_weight_only with no precision, group, zero point or algorithm: a GGUF keeps its blocks (gguf.py)
    from_source: bool = False
    mixed: bool = False  # GGUF: int8 and int4 linears in one engine (the codes' dtype tells each one's)
    source_formats: dict | None = field(default=None, compare=False)  # GGUF: {block type: linears}
    # SmoothQuant (algo "sq"): migration strength, weight steps per channel / per tensor, activation steps per
    # token / static, the linears left weight-only (no fold), and the static steps by weight name once calibrated
    sq_alpha: float = 0.5
    sq_per_channel: bool = False
    sq_per_token: bool = False
    sq_weight_only: tuple = ()
    sq_steps: dict = field(default=None, compare=False, repr=False)

    @property
    def quant_algo(self) -> str:
        """TensorRT-LLM's QuantAlgo value."""
        if self.mixed:
            return "MIXED_PRECISION"
        if self.algo == "sq":
            return SQ_ALGOS[self.sq_per_channel, self.sq_per_token]
        base = "W8A16" if self.precision == "int8" else "W4A16"
        return base + {"rtn": "", "awq": "_AWQ", "gptq": "_GPTQ", "gguf": ""}[self.algo]

    def config(self) -> dict:
        if self.algo == "sq":
            return {"quant_algo": self.quant_algo, "group_size": None, "has_zero_point": False,
                    "exclude_modules": ["transformer.vocab_embedding", "lm_head"], "smoothquant_val": self.sq_alpha,
                    "weight_only_modules": list(self.sq_weight_only)}
        out = {"quant_algo": self.quant_algo, "group_size": self.group_size, "has_zero_point": self.zero_point,
               "exclude_modules": ["transformer.vocab_embedding"] + ([] if self.quantize_lm_head else ["lm_head"]),
               "weight_only_precision": "mixed" if self.mixed else self.precision,
               "lm_head_precision": self.lm_head_precision if self.quantize_lm_head else None}
        if self.source_formats is not None:
            out["source_formats"] = dict(self.source_formats)
        return out

    def quantizes(self, name: str) -> bool:
        return name.endswith(QUANTIZED_SUFFIXES) or (self.quantize_lm_head and name == LM_HEAD)

    def for_tensor(self, name: str) -> "QuantScheme":
        """lm_head: int8 per channel whatever the layers use, or int4 (--quantize_lm_head int4) in the layers'
        group size when they are int4, else 128; round to nearest either way (AWQ's search covers the layers)."""
        if name == LM_HEAD:
            if self.lm_head_precision == "int4":
                group = self.group_size if self.precision == "int4" else 128
                return QuantScheme("int4", group, self.zero_point, "rtn", True, "int4")
            return QuantScheme("int8", -1, self.zero_point, "rtn", True)
        return self

    def prequant(self, name: str, meta: bool = False) -> torch.Tensor | None:
        """The AWQ prequant factor of weight `name`, if its scale could not be folded."""
        f = self.awq.prequant.get(name) if self.awq is not None else None
        return None if f is None else (torch.empty_like(f, device="meta") if meta else f)


def parse_scheme(precision: str | None, group_size: int | None = None, zero_point: bool = False,
                 algo: str = "rtn", quantize_lm_head: bool | str = False) -> QuantScheme:
    """Validate the command-line choice. group_size None: 128 for int4, per channel for int8.
    quantize_lm_head: False, True / "int8" (per channel) or "int4"."""
    head = "int8" if quantize_lm_head is True else quantize_lm_head or "int8"
    if head not in PRECISIONS:
        raise UserError(f"--quantize_lm_head takes int8 or int4, got {quantize_lm_head!r}")
    quantize_lm_head = bool(quantize_lm_head)
    if precision not in PRECISIONS:
        raise UserError(f"--weight_only_precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if algo not in ALGOS:
        raise UserError(f"--quant_algo {algo!r} is unknown; use one of {', '.join(ALGOS)} "
                        "(rtn: round to nearest; awq: activation-aware scales, int4 only)")
    if precision == "int8":
        if group_size not in (None, -1):
            raise UserError(f"int8 weight-only quantization is per channel (TensorRT-LLM's W8A16); "
                            f"drop --group_size {group_size} or pass -1")
        if algo == "awq":
            raise UserError("--quant_algo awq is for int4 (W4A16_AWQ); use --weight_only_precision int4")
        return QuantScheme("int8", -1, zero_point, algo, quantize_lm_head, head)
    group_size = 128 if group_size is None else group_size
    if group_size != -1 and (group_size < 2 or group_size % 2):
        raise UserError(f"--group_size must be -1 (per channel) or an even size such as "
                        f"{', '.join(map(str, GROUP_SIZES))}; got {group_size}")
    return QuantScheme("int4", group_size, zero_point, algo, quantize_lm_head, head)


@dataclass
class QuantizedWeight:
    """One linear's weight as integer codes (unpacked) with its scales: see the module docstring."""

    q: torch.Tensor  # (out, in) int8 codes, or uint8 codes 0..15 for int4
    scale: torch.Tensor  # (out, groups) float32
    zero: torch.Tensor | None  # (out, groups) int8 / uint8, None: symmetric (0 for int8, 8 for int4)
    pre_scale: torch.Tensor | None = None  # (in,) float32: the activation is multiplied by it first
    precision: str = "int8"
    minimum: torch.Tensor | None = None  # (out, groups) float32: W = q * scale + minimum (zero is None then)
    grouped: bool = False  # int8 stored per group, even where a rank's slice holds one group
    act_scale: torch.Tensor | None = None  # (1,) float32: SmoothQuant's static activation step

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def offsets(self) -> torch.Tensor:
        """(out, groups) float32 term added to q * scale: the minimum, or -zero * scale."""
        if self.minimum is not None:
            return self.minimum.float()
        return -implied_zero(self).float() * self.scale.float()


def _group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    return w.reshape(out_f, in_f // g, g)  # (out, groups, group)


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> QuantizedWeight:
    """Round to nearest. w: (out, in) float. Works on meta tensors (shapes only)."""
    out_f, in_f = w.shape
    g = in_f if scheme.group_size == -1 else scheme.group_size
    if in_f % g:
        raise UserError(f"{name}: --group_size {g} does not divide its {in_f} inputs; "
                        f"valid group sizes: {', '.join(map(str, valid_group_sizes([in_f])))}")
    if scheme.precision == "int4" and in_f % 2:
        raise UserError(f"{name}: int4 packs two inputs a byte, but its width {in_f} is odd; use int8")
    wg = _group(w.float(), scheme.group_size)  # (out, groups, group)
    q, scale, zero = _round(wg, scheme)
    code_dtype = torch.int8 if scheme.precision == "int8" else torch.uint8
    out_f, in_f = w.shape
    return QuantizedWeight(q.reshape(out_f, in_f).to(code_dtype), scale,
                           zero.to(code_dtype) if scheme.zero_point else None, None, scheme.precision,
                           grouped=scheme.precision == "int8" and scheme.group_size != -1)


def _round(wg: torch.Tensor, scheme: QuantScheme):
    """Codes (as floats), scale and zero of grouped weights (out, groups, group). The full range is kept:
    shrinking it per group to the lowest squared error (llama.cpp's k-quant search) was tried and raised
    SmolLM2's perplexity (int8 12.55 -> 12.62, int4 g64 16.90 -> 17.34): the clipped large weights matter."""
    if scheme.precision == "int8":
        lo_code, hi_code = -128, 127
    else:
        lo_code, hi_code = 0, 15
    if scheme.zero_point:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / (hi_code - lo_code)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = (torch.round(-lo / scale) + lo_code).clamp(lo_code, hi_code)  # (out, groups)
    else:
        if scheme.precision == "int8":
            scale = wg.abs().amax(-1) / 127
        else:  # Q4_0: the signed value of largest magnitude maps to code 0 (-8 after centring)
            idx = wg.abs().argmax(-1, keepdim=True)
            scale = wg.gather(-1, idx).squeeze(-1) / -8
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, 0 if scheme.precision == "int8" else 8)
    q = (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(lo_code, hi_code)
    return q, scale, zero


def implied_zero(qw: QuantizedWeight) -> torch.Tensor:
    if qw.zero is not None:
        return qw.zero
    return torch.full(qw.scale.shape, 0 if qw.precision == "int8" else 8, dtype=torch.int16, device=qw.scale.device)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """(out, in) float32 weight the codes stand for (the reference every kernel is checked against)."""
    out_f, in_f = qw.q.shape
    groups = qw.scale.shape[1]
    q = qw.q.reshape(out_f, groups, in_f // groups).float()  # (out, groups, group)
    if qw.minimum is not None:
        w = q * qw.scale.float().unsqueeze(-1) + qw.minimum.float().unsqueeze(-1)
    else:
        w = (q - implied_zero(qw).float().unsqueeze(-1)) * qw.scale.float().unsqueeze(-1)
    w = w.reshape(out_f, in_f)
    if qw.pre_scale is not None:  # y = (x * f) W^T = x (W * f)^T
        w = w * qw.pre_scale.float()
    return w


# ---------------------------------------------------------------------------
# sharding: the partition rules applied to every part of a quantized weight


def shard_quantized(rule: str, qw, plan: pt.RankPlan, head_dim: int, row_span=None) -> QuantizedWeight:
    """One rank's slice of a quantized weight (for QKV, a (q, k, v) tuple of them).

    rule: the converter's partition rule; row_span: [start, end) of the inputs for row rules."""
    if rule == pt.QKV:
        parts = {f: pt.shard_qkv(*(getattr(x, f) for x in qw), plan.heads, head_dim) for f in ("q", "scale")}
        zero = (pt.shard_qkv(*(x.zero for x in qw), plan.heads, head_dim) if qw[0].zero is not None else None)
        minimum = (pt.shard_qkv(*(x.minimum for x in qw), plan.heads, head_dim) if qw[0].minimum is not None
                   else None)
        return QuantizedWeight(parts["q"], parts["scale"], zero, qw[0].pre_scale, qw[0].precision, minimum,
                               qw[0].grouped, qw[0].act_scale)
    if rule == pt.COLUMN:
        rows = lambda t: None if t is None else pt.shard_column(t, plan.mlp_span)  # noqa: E731
    elif rule == pt.VOCAB:
        # padding rows get codes 0 and scale 0: zero logits, masked by the head anyway
        rows = lambda t: None if t is None else pt.shard_vocab(t, plan.rank, plan.tp)  # noqa: E731
    elif rule in (pt.ROW_ATTN, pt.ROW_MLP):
        start, end = row_span
        g = qw.group_size
        if qw.scale.shape[1] == 1:
            gspan = (0, 1)  # per channel: every rank keeps the whole row's scale
        elif start % g or end % g:
            raise ValueError(f"row slice [{start}, {end}) is not in whole groups of {g}")  # checked at planning
        else:
            gspan = (start // g, end // g)
        return QuantizedWeight(pt.shard_row(qw.q, row_span), pt.shard_row(qw.scale, gspan),
                               None if qw.zero is None else pt.shard_row(qw.zero, gspan),
                               None if qw.pre_scale is None else qw.pre_scale[start:end], qw.precision,
                               None if qw.minimum is None else pt.shard_row(qw.minimum, gspan), qw.grouped,
                               qw.act_scale)
    else:
        raise ValueError(f"rule {rule} has no quantized slicing")
    return QuantizedWeight(rows(qw.q), rows(qw.scale), rows(qw.zero), qw.pre_scale, qw.precision,
                           rows(qw.minimum), qw.grouped, qw.act_scale)


def engine_tensors(name: str, qw: QuantizedWeight) -> list[tuple[str, torch.Tensor]]:
    """The rank-file tensors of one quantized linear `name` (= "<prefix>.weight"), in file order."""
    prefix = name.removesuffix(".weight")
    if qw.precision == "int8" and not qw.grouped:
        out = [(name, qw.q.to(torch.int8)), (f"{prefix}.per_channel_scale", qw.scale[:, 0].float().contiguous())]
        if qw.zero is not None:
            out.append((f"{prefix}.zero", qw.zero[:, 0].contiguous()))
    else:  # int4, or int8 per group: the codes' dtype tells them apart
        codes = qw.q.to(torch.int8) if qw.precision == "int8" else pack_int4(qw.q)
        out = [(name, codes), (f"{prefix}.weights_scaling_factor", qw.scale.float().contiguous())]
        if qw.zero is not None:
            out.append((f"{prefix}.zero", qw.zero.contiguous()))
        if qw.minimum is not None:
            out.append((f"{prefix}.minimum", qw.minimum.float().contiguous()))
    if qw.pre_scale is not None:
        out.append((f"{prefix}.prequant_scaling_factor", qw.pre_scale.float().contiguous()))
    if qw.act_scale is not None:
        out.append((f"{prefix}.act_scale", qw.act_scale.float().reshape(1)))
    return out


def from_engine_tensors(name: str, tensors: dict, precision: str) -> QuantizedWeight:
    """Inverse of engine_tensors (tests, and the runtime's own loader uses the same layout)."""
    prefix = name.removesuffix(".weight")
    w = tensors[name]
    if precision == "int8" and f"{prefix}.per_channel_scale" in tensors:
        scale = tensors[f"{prefix}.per_channel_scale"].float().unsqueeze(1)
        zero = tensors.get(f"{prefix}.zero")
        zero = zero.unsqueeze(1) if zero is not None else None
        q = w
    else:
        scale = tensors[f"{prefix}.weights_scaling_factor"].float()
        zero = tensors.get(f"{prefix}.zero")
        q = w if precision == "int8" else unpack_int4(w)
    return QuantizedWeight(q, scale, zero, tensors.get(f"{prefix}.prequant_scaling_factor"), precision,
                           tensors.get(f"{prefix}.minimum"), precision == "int8" and w.dtype == torch.int8
                           and f"{prefix}.per_channel_scale" not in tensors, tensors.get(f"{prefix}.act_scale"))


# ---------------------------------------------------------------------------
# checks made while planning, before any tensor data is read


def valid_group_sizes(widths: list[int], starts: list[int] = ()) -> list[int]:
    """Group sizes (of GROUP_SIZES, and -1) that divide every width and slice start."""
    ok = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths) and all(s % g == 0 for s in starts)]
    return ok + [-1]


def check_slices(scheme: QuantScheme, name: str, in_features: int, row_spans: list | None, tp: int,
                 model: str = "model") -> None:
    """A clear error when the group size does not fit a weight or one rank's slice of it.

    row_spans: each rank's [start, end) of the inputs for row-parallel weights, else None."""
    scheme = scheme.for_tensor(name)
    if scheme.precision == "int8" and scheme.group_size == -1:
        return  # per channel: any width, any slice
    spans = row_spans or [(0, in_features)]
    widths = [e - s for s, e in spans]
    starts = [s for s, _ in spans]
    g = scheme.group_size
    if g == -1:
        if any(w % 2 for w in widths):
            raise UserError(f"{model}: int4 packs two inputs a byte, but {name} has an odd input width "
                            f"({', '.join(map(str, widths))} per rank at tp_size={tp}); use int8 or a group size")
        return
    if all(w % g == 0 for w in widths) and all(s % g == 0 for s in starts):
        return
    where = (f"input slices of {widths} per rank at tp_size={tp}" if row_spans
             else f"{in_features} inputs")
    raise UserError(f"{model}: --group_size {g} does not divide {name}'s {where}; "
                    f"valid group sizes: {', '.join(map(str, valid_group_sizes(widths, starts)))}")

