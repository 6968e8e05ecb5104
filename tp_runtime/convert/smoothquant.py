"""SmoothQuant (W8A8) for the converter: per-input-channel smoothing scales from calibration activations,
then int8 weights whose activations the runtime rounds to int8 too (runtime/woq/format.py).

For a linear fed x and any per-input-channel s > 0:   x W^T = (x / s) (W * s)^T.
Outlier channels of x make int8 activations coarse for every other channel; dividing them by s moves that
range into W's columns, which are quantized per output row and take it better. As the SmoothQuant paper does,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        alpha in [0, 1] (--smoothquant ALPHA)

with max|X_j| over every calibration token and max|W_j| over the j-th column of every linear fed that input
(q, k, v together; fc and gate together). The 1 / s has to go where the math is exact, so the run time pays
nothing for it:

    qkv       <- input_layernorm's weight (and bias)            pre-norm families
    fc, gate  <- post_layernorm's weight (and bias)             pre-norm families (a parallel residual too:
                                                                its MLP has its own norm of x)
    proj      <- the rows of mlp.gate (HF up_proj)              gated MLPs: act(fc y) * (gate y) is linear in gate
    dense     <- the rows of v                                  attention output channel h*D + d is a mix of
                                                                v head (h // group)'s channel d, so with GQA the
                                                                scale is one per v channel: dense's columns of a
                                                                KV group's heads share it (the max of their
                                                                activations and of their weight columns)

A linear with no such fold (the post-norm blocks of EXAONE-4 have no norm before qkv and fc / gate; a plain
MLP's proj follows a non-linear activation) is not smoothed and stays weight-only int8 (W8A16): the engine
lists it in quantization.weight_only_modules and tp-convert says which.

Then each smoothed weight is rounded to int8, per output channel (--per_channel) or with one step for the whole
linear (q, k and v share it), and, without --per_token, the activation gets one static step: max|X / s| / 127
over the calibration tokens (P.act_scale).

Calibration is AWQ's (awq.py): the calibration text tokenized as the engine will have it, run layer by layer
through the reference forward (reference.py) with the original float weights, the four linear groups' inputs
recorded; only their per-channel maxima are kept. Memory: one float32 layer and the calibration hidden states.
The scales are computed on the whole layer; the pipeline shards the transformed tensors like any others, so the
engine is the same function at every tp.
"""

import torch

from tp_runtime.convert import awq
from tp_runtime.convert import quantize as qz
from tp_runtime.convert.reference import LINEAR_INPUTS, ReferenceDecoder
from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError

EPS = 1e-5  # floor of max|X_j| and max|W_j| (a dead channel keeps s finite)


def quant_algo(per_channel: bool, per_token: bool) -> str:
    """TensorRT-LLM's QuantAlgo name of the SmoothQuant variant."""
    return qz.SQ_ALGOS[per_channel, per_token]


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise UserError(f"--smoothquant takes the migration strength alpha in [0, 1] (0.5 is usual), got {alpha}")
    return float(alpha)


def weight_only_modules(cfg: dict) -> tuple[list[str], str]:
    """The linears whose smoothing has no fold (they stay W8A16), and one line saying why (empty if none)."""
    post = cfg.get("norm_placement", "pre") == "post"
    gated = cfg.get("gated_mlp", True)
    names, why = [], []
    for i in range(cfg["num_hidden_layers"]):
        p = ef.layer_prefix(i)
        if post:
            names += [f"{p}.attention.qkv", f"{p}.mlp.fc"] + ([f"{p}.mlp.gate"] if gated else [])
        if not gated:
            names.append(f"{p}.mlp.proj")
    if post:
        why.append("attention.qkv and mlp.fc/gate (post-norm blocks: no norm before them takes 1/s)")
    if not gated:
        why.append("mlp.proj (it follows the activation function: nothing linear before it takes 1/s)")
    line = ""
    if names:
        line = (f"smoothquant: {len(names)} linears stay weight-only int8 (W8A16) in every layer's "
                + " and ".join(why))
    return names, line


def layer_maxima(tensors: dict, cfg: dict, windows: list[list[int]]):
    """Yields (i, {'qkv' | 'dense' | 'fc_gate' | 'proj': max |x| per input channel (in,)}) for each layer in turn,
    by the reference forward with the original float weights (only the hidden states are carried between)."""
    ref = ReferenceDecoder(tensors, cfg)
    x = ref.embed(torch.tensor(windows))  # (windows, seq_len, hidden)
    for i in range(ref.cfg["num_hidden_layers"]):
        maxima = {}

        def record(key, y):  # y: (rows, seq_len, in)
            m = y.detach().float().abs().reshape(-1, y.shape[-1]).amax(0)  # (in,)
            maxima[key] = m if key not in maxima else torch.maximum(maxima[key], m)

        x = ref.layer_forward(i, x, record=record, max_tokens=awq.CHUNK_TOKENS)
        yield i, {key: maxima[key] for key in LINEAR_INPUTS}


def smoothing_scale(act_max: torch.Tensor, weights: list, alpha: float) -> torch.Tensor:
    """s (in,) = max|X_j|^alpha / max|W_j|^(1 - alpha), weights: the (out, in) linears sharing the input."""
    w_max = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)  # (in,)
    s = act_max.float().clamp(min=EPS).pow(alpha) / w_max.clamp(min=EPS).pow(1 - alpha)
    return s.clamp(min=EPS)


def group_dense(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int, reduce: bool) -> torch.Tensor:
    """dense's input channels (heads * D,) <-> v's output channels (kv_heads * D,): reduce=True takes the max
    over each KV group's query heads; reduce=False repeats a v channel's value for every head of its group."""
    group = heads // kv_heads
    if reduce:
        return t.view(kv_heads, group, head_dim).amax(1).reshape(-1)  # (kv_heads, group, D) -> (kv_heads * D,)
    return t.view(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1)  # -> (heads * D,)


def search(ckpt, ckpt_tensors: dict, cfg: dict, alpha: float, calib_file: str | None, samples: int,
           seq_len: int, progress: bool = False, maxima: dict | None = None):
    """The smoothing transforms (an awq.AwqResult: columns times s, norms and rows divided by s) and the static
    activation step of every smoothed linear (weight name -> (1,) tensor), layer by layer. maxima: precomputed
    {(layer, key): max |x| (in,)} (tests), else calibrated on the text."""
    layers = cfg["num_hidden_layers"]
    if maxima is None:
        windows = awq.calibration_windows(ckpt, calib_file, samples, seq_len)
        per_layer = layer_maxima(ckpt_tensors, cfg, windows)
    else:
        per_layer = ((i, {key: maxima[(i, key)] for key in LINEAR_INPUTS}) for i in range(layers))
    res, steps = awq.AwqResult(), {}
    skip = set(weight_only_modules(cfg)[0])
    from tqdm import tqdm

    for i, acts in tqdm(per_layer, total=layers, desc="SmoothQuant calibration", unit="layer", disable=not progress):
        _smooth_layer(res, steps, i, acts, ckpt_tensors, cfg, alpha, skip)
    return res, steps


def _smooth_layer(res, steps: dict, i: int, acts: dict, tensors: dict, cfg: dict, alpha: float, skip: set) -> None:
    p = ef.layer_prefix(i)
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    gated = cfg.get("gated_mlp", True)
    groups = {"qkv": [f"{p}.attention.qkv.weight"], "dense": [f"{p}.attention.dense.weight"],
              "fc_gate": [f"{p}.mlp.fc.weight"] + ([f"{p}.mlp.gate.weight"] if gated else []),
              "proj": [f"{p}.mlp.proj.weight"]}
    for key, names in groups.items():
        if names[0].removesuffix(".weight") in skip:
            continue
        ws = []
        for n in names:
            t = tensors[n].load(False)
            ws.extend(t if isinstance(t, tuple) else [t])
        act_max = acts[key].float()
        if key == "dense":  # one scale per v channel, shared by the query heads of its KV group
            w_cols = group_dense(ws[0].float().abs().amax(0), H, Hkv, D, reduce=True)
            a_v = group_dense(act_max, H, Hkv, D, reduce=True)
            s_v = (a_v.clamp(min=EPS).pow(alpha) / w_cols.clamp(min=EPS).pow(1 - alpha)).clamp(min=EPS)
            s = group_dense(s_v, H, Hkv, D, reduce=False)
            res.qkv_v_div[f"{p}.attention.qkv.weight"] = s_v
            if f"{p}.attention.qkv.bias" in tensors:
                res.qkv_v_div[f"{p}.attention.qkv.bias"] = s_v
        else:
            s = smoothing_scale(act_max, ws, alpha)
            fold = {"qkv": f"{p}.input_layernorm", "fc_gate": f"{p}.post_layernorm", "proj": f"{p}.mlp.gate"}[key]
            for part in ("weight", "bias"):
                if f"{fold}.{part}" in tensors:
                    res.row_div[f"{fold}.{part}"] = s
        del ws
        for n in names:
            res.col_scale[n] = s
            steps[n] = ((act_max / s).max() / 127).clamp(min=1e-12).reshape(1)


def quantize_linear(name: str, full, scheme: "qz.QuantScheme"):
    """One smoothed linear (a tensor, or (q, k, v)) as int8 codes: per output channel, or with one step for the
    whole linear; with its static activation step unless per token. Works on meta tensors."""
    parts = full if isinstance(full, tuple) else (full,)
    module = name.removesuffix(".weight")
    if module in scheme.sq_weight_only:  # no fold: plain W8A16 per channel
        out = tuple(qz.quantize_rtn(t, qz.QuantScheme("int8", -1), name) for t in parts)
        return out if isinstance(full, tuple) else out[0]
    if scheme.sq_per_channel:
        out = [qz.quantize_rtn(t, qz.QuantScheme("int8", -1), name) for t in parts]
    else:
        step = torch.stack([t.float().abs().amax() for t in parts]).amax() / 127  # one for q, k and v
        step = torch.where(step == 0, torch.ones_like(step), step)
        out = [qz.QuantizedWeight(torch.round(t.float() / step).clamp(-127, 127).to(torch.int8),
                                  step.expand(t.shape[0], 1).contiguous(), None) for t in parts]
    if not scheme.sq_per_token:
        meta = parts[0].is_meta
        act = torch.empty(1, device="meta") if meta else scheme.sq_steps[name].float()
        for qw in out:
            qw.act_scale = act
    return tuple(out) if isinstance(full, tuple) else out[0]
