"""Pre-quantized Llama-family checkpoints (AutoAWQ GEMM, GPTQ), read without re-quantizing.

transformers writes the scheme into config.json's `quantization_config`; each quantized linear `P`
(q/k/v/o_proj, gate/up/down_proj) then holds, instead of P.weight:

    AutoAWQ, version "gemm" (quant_method "awq"):
        P.qweight int32 (in, out / 8)      eight 4-bit codes an int32 along the outputs, in the order
                                           AWQ_ORDER: nibble i (bits 4i..4i+3) is output 8c + AWQ_ORDER[i]
        P.qzeros  int32 (in / group, out / 8)   zeros, packed the same way
        P.scales  fp16  (in / group, out)
        W[o, i] = (code[i, o] - zero[i // group, o]) * scale[i // group, o]
    GPTQ (quant_method "gptq", AutoGPTQ / optimum's v1 format):
        P.qweight int32 (in / 8, out)      eight codes an int32 along the inputs: nibble j is input 8r + j
        P.qzeros  int32 (groups, out / 8)  along the outputs, nibble j is output 8c + j, stored as zero - 1
        P.scales  fp16  (groups, out)
        P.g_idx   int32 (in,)              group of each input: read when it is i // group (see act-order)
        W[o, i] = (code[i, o] - (zero[g_idx[i], o] + 1)) * scale[g_idx[i], o]

GPTQ act-order (desc_act): the inputs are quantized in order of decreasing activation, and without
static_groups each group is a run of that order, so g_idx is a scattered map and a group's inputs are
not contiguous. The engine's layout (a scale per row and run of `group` inputs, as TensorRT-LLM's
W4A16_GPTQ without act-order) cannot hold that: it would need the activations permuted before every
quantized matmul, differently in each layer. Such a checkpoint is refused, naming the first linear.
An act-order checkpoint made with static_groups=True has g_idx = i // group (the groups were fixed
before the reordering) and is read like any other.

Each becomes a quantize.QuantizedWeight (codes, scales, zeros in our layout), so the converter shards
and writes it exactly as it does its own RTN output: the codes and scales are the checkpoint's own.
"""

import torch

from tp_runtime.convert import quantize as qz
from tp_runtime.convert.checkpoint import Checkpoint
from tp_runtime.errors import UserError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _unpack_cols(packed: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """(rows, cols / 8) int32 -> (rows, cols) codes 0..15; nibble i of column c is column 8c + order[i]."""
    rows, n = packed.shape
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # (rows, n, 8) by nibble
    out = torch.empty_like(nibbles)
    out[..., list(order)] = nibbles  # position order[i] <- nibble i
    return out.reshape(rows, n * 8)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """(rows / 8, cols) int32 -> (rows, cols): nibble j of row r is row 8r + j."""
    n, cols = packed.shape
    nibbles = torch.stack([(packed >> (4 * j)) & 0xF for j in range(8)], dim=1)  # (n, 8, cols)
    return nibbles.reshape(n * 8, cols)


class PrequantizedReader:
    """Serves the virtual `P.weight` of a quantized linear as a QuantizedWeight (shape (out, in))."""

    def __init__(self, ckpt: Checkpoint, method: str, group_size: int, desc_act: bool = False):
        self.ckpt, self.method, self.group_size, self.desc_act = ckpt, method, group_size, desc_act

    def shape(self, prefix: str) -> tuple[int, int]:
        scales = self.ckpt.shape(f"{prefix}.scales")  # (groups, out)
        q = self.ckpt.shape(f"{prefix}.qweight")
        in_f = q[0] if self.method == "awq" else q[0] * 8
        return scales[1], in_f

    def dtype(self, prefix: str) -> torch.dtype:
        return self.ckpt.dtype(f"{prefix}.scales")

    def load(self, prefix: str) -> qz.QuantizedWeight:
        ck = self.ckpt
        qweight, qzeros, scales = (ck.load(f"{prefix}.{p}") for p in ("qweight", "qzeros", "scales"))
        if self.method == "awq":
            codes = _unpack_cols(qweight, AWQ_ORDER)  # (in, out)
            zeros = _unpack_cols(qzeros, AWQ_ORDER)  # (groups, out)
        else:
            codes = _unpack_rows(qweight)  # (in, out)
            zeros = _unpack_cols(qzeros) + 1  # (groups, out), v1's zero - 1 undone
            in_f = codes.shape[0]
            if f"{prefix}.g_idx" in ck:
                g_idx = ck.load(f"{prefix}.g_idx").long()
                if not torch.equal(g_idx, torch.arange(in_f) // self.group_size):
                    raise UserError(f"{prefix}: act-order GPTQ (desc_act) with a g_idx that is not input // "
                                    f"{self.group_size}: its groups are scattered inputs, which the engine's "
                                    "contiguous groups cannot hold; quantize with desc_act=False or "
                                    "static_groups=True")
            elif self.desc_act:
                raise UserError(f"{prefix}: an act-order GPTQ checkpoint (desc_act) without {prefix}.g_idx")
        return qz.QuantizedWeight(codes.t().contiguous().to(torch.uint8), scales.t().float().contiguous(),
                                  zeros.t().contiguous().to(torch.uint8), None, "int4")


def scheme_of(config: dict) -> qz.QuantScheme | None:
    """The QuantScheme a pre-quantized checkpoint carries, or None for a float checkpoint."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise UserError(f"quantization_config.quant_method {method!r} is not read; tp-convert reads awq "
                        "(AutoAWQ GEMM) and gptq checkpoints, or float ones")
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if bits != 4:
        raise UserError(f"{method} checkpoints with {bits}-bit weights are not read; only 4-bit ones")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise UserError(f"AWQ version {qc.get('version')!r} is not read; only the GEMM packing")
    if not isinstance(group, int) or group < 2:
        raise UserError(f"{method} checkpoint: group_size {group!r} is not supported (per-group checkpoints only)")
    return qz.QuantScheme("int4", group, zero_point=True, algo=method, prequantized=True)


def open_prequantized(ckpt: Checkpoint) -> tuple[Checkpoint, qz.QuantScheme | None]:
    """A float-looking view of a pre-quantized checkpoint: every `P.qweight` group appears as `P.weight`
    (shape (out, in), the scales' dtype) that loads as a QuantizedWeight. Float checkpoints pass through."""
    scheme = scheme_of(ckpt.config)
    if scheme is None:
        return ckpt, None
    desc_act = bool(ckpt.config["quantization_config"].get("desc_act"))  # g_idx is checked per linear
    reader = PrequantizedReader(ckpt, scheme.algo, scheme.group_size, desc_act)
    names = ckpt.names()
    index = {n: (_Passthrough(ckpt), n) for n in names if n.rsplit(".", 1)[-1] not in PARTS}
    for n in names:
        if n.endswith(".qweight"):
            prefix = n[: -len(".qweight")]
            index[f"{prefix}.weight"] = (reader, prefix)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    return Checkpoint(config, index, ckpt.generation_config, ckpt.tokenizer_dir), scheme


class _Passthrough:
    def __init__(self, ckpt):
        self.ckpt = ckpt

    def shape(self, name):
        return self.ckpt.shape(name)

    def dtype(self, name):
        return self.ckpt.dtype(name)

    def load(self, name):
        return self.ckpt.load(name)
