"""The quantize and partition stages for one canonical tensor: quantized once, whole (each of q, k, v on its
own), then sliced for each rank by its partition rule, codes, scales and zeros with the same slices.

Works on meta tensors too, so tp-plan and the converter's plan see every rank file's exact tensors.
"""

import torch

from tp_runtime.convert import partition as pt
from tp_runtime.convert import quantize as qz
from tp_runtime.convert import smoothquant
from tp_runtime.convert.adapters import CanonicalTensor
from tp_runtime.convert.partition import QKV


def prepare_tensor(ct: CanonicalTensor, full, quant: "qz.QuantScheme | None"):
    """The unsharded tensor as the rank files will slice it: quantized once here when the scheme
    covers it (each of q, k, v on its own), else unchanged."""
    if quant is None or not quant.quantizes(ct.name):
        return full
    if isinstance(full[0] if isinstance(full, tuple) else full, qz.QuantizedWeight):
        return full  # read from a pre-quantized checkpoint: its own codes and scales
    if quant.algo == "sq":
        return smoothquant.quantize_linear(ct.name, full, quant)
    scheme = quant.for_tensor(ct.name)
    if ct.rule == QKV:
        parts = tuple(qz.quantize_rtn(t, scheme, ct.name) for t in full)
        meta = full[0].is_meta
    else:
        parts = (qz.quantize_rtn(full, scheme, ct.name),)
        meta = full.is_meta
    for qw in parts:
        qw.pre_scale = quant.prequant(ct.name, meta)
    return parts if ct.rule == QKV else parts[0]


def rank_tensors(ct: CanonicalTensor, prepared, plan: pt.RankPlan, head_dim: int, out_dtype: torch.dtype):
    """[(engine name, tensor)] of one canonical tensor for one rank: its slice in the engine dtype, or the
    slices of its codes, scales and zeros."""
    first = prepared[0] if isinstance(prepared, tuple) else prepared
    if isinstance(first, qz.QuantizedWeight):
        part = qz.shard_quantized(ct.rule, prepared, plan, head_dim, pt.row_span(ct.rule, plan, head_dim))
        return qz.engine_tensors(ct.name, part)
    s = pt.shard_tensor(ct.rule, prepared, plan, head_dim)
    return [(ct.name, s.to(out_dtype) if s.dtype.is_floating_point else s)]


def check_quantized_slices(quant: "qz.QuantScheme", ct: CanonicalTensor, meta, plans, head_dim: int,
                           model: str) -> None:
    first = meta[0] if isinstance(meta, tuple) else meta
    in_features = (first.q if isinstance(first, qz.QuantizedWeight) else first).shape[1]
    spans = [pt.row_span(ct.rule, p, head_dim) for p in plans]
    qz.check_slices(quant, ct.name, in_features, spans if spans[0] is not None else None, len(plans), model)
