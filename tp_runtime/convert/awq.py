"""AWQ (activation-aware weight quantization) for the converter: per-input-channel scales searched on
calibration activations, then round-to-nearest.

For a linear fed x, and any per-input-channel s > 0:   x W^T = (x / s) (W * s)^T.
Quantizing W * s instead of W protects the input channels with large activations (their weights are
scaled up, so rounding costs them less), at the price of the others. As AutoAWQ does, s = mean|x|^alpha
(normalised), alpha on a grid in [0, 1) chosen per layer group to minimise || x W^T - (x/s) Q(W s)^T ||
on the calibration activations (alpha = 0 is plain RTN, so the search never does worse on them).

Then, as AutoAWQ's auto_clip, a clipping search on the scaled weights W s (fed x / s): for each row and
group of every quantized linear but the query and key projections (their errors go through the softmax),
the range kept before rounding is shrunk by a ratio r in 1, 0.95, ..., 0.55 ([M r, -7/8 M r] with M the
group's value of largest magnitude, symmetric Q4_0's own range; [lo r, hi r] with zero points), r chosen
per (row, group) to minimise the squared error of that group's share of the output on the calibration
tokens:

    err[o, g] = (dW[o, g] X_g^T X_g dW[o, g]^T) / n        dW = Q(clip(W s)) - W s, X = x / s (n tokens)

computed from each group's Gram matrix X_g^T X_g (one (group, group) matrix per group, not one product per
token). A weight whose clipped groups add up to a larger error of its whole output (the groups' cross
terms) keeps its full ranges, so the clip never does worse on the calibration tokens. The weights are
clamped to the chosen ranges as they are loaded, then rounded as usual. Clipping sacrifices the few
largest weights of a group for a finer step on the rest; weighing the error by real activations is what
makes that pay (a weight-space MSE clip did not: quantize.py's _round).

The 1 / s goes where the math allows, so it costs nothing at run time:
    qkv       <- input_layernorm (weight and bias divided by s)            pre-norm families
    fc, gate  <- post_layernorm                                             pre-norm families
    proj      <- the rows of mlp.gate (HF up_proj): act(fc x) * (gate x) is linear in gate's output
    dense     <- the rows of v, when every query head has its own KV head (no GQA)
and otherwise into a `prequant_scaling_factor` that multiplies the activation before the matmul.

Calibration runs layer by layer, as AutoAWQ and ModelOpt do, on the reference forward of the canonical
decoder (reference.py) fed by the adapter's own tensors: the calibration text is tokenized with the
checkpoint's tokenizer (as the engine will have it), cut into windows, embedded; then for each decoder layer
in turn, the layer runs on the carried hidden states while the inputs of its four linear groups are recorded,
its scales and clips are searched, and its output (computed with the original float weights) is carried to
the next layer. Memory: one float32 layer, the calibration hidden states and one layer's recorded inputs,
whatever the depth; no engine is built and nothing of the runtime is imported. The scales are searched on
the whole (unsharded) layer; the pipeline shards the transformed tensors like any others.
"""

import os
import tempfile
from dataclasses import dataclass, field

import torch

from tp_runtime.convert import quantize as qz
from tp_runtime.convert.adapters import get_adapter
from tp_runtime.convert.checkpoint import Checkpoint, open_checkpoint
from tp_runtime.convert.reference import LINEAR_INPUTS, ReferenceDecoder
from tp_runtime.convert.writer import copy_tokenizer
from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError

GRID = 20  # alpha in 0, 0.05, ..., 0.95
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # clip ratios 1, 0.95, ..., 0.55 (AutoAWQ's n_grid, max_shrink)
MAX_ROWS = 1024  # calibration tokens kept per linear for the search (mean |x| uses them all)
CHUNK_TOKENS = 2048  # calibration tokens run through a layer at once (bounds attention scores and the MLP)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class AwqResult:
    """What the converter applies: tensor transforms by engine name, and prequant factors."""

    col_scale: dict = field(default_factory=dict)  # weight name -> s (in,): columns multiplied by s
    row_div: dict = field(default_factory=dict)  # tensor name -> s: divided by s along dim 0 (norms, rows)
    qkv_v_div: dict = field(default_factory=dict)  # qkv weight / bias name -> s: v's rows divided by s
    prequant: dict = field(default_factory=dict)  # weight name -> 1 / s (in,)
    alphas: dict = field(default_factory=dict)  # group name -> chosen alpha (reported)
    errors: dict = field(default_factory=dict)  # group name -> (rtn error, awq error) on the calibration rows
    clip: dict = field(default_factory=dict)  # weight name -> {part: (lo, hi) (out, groups)}; part 2 = qkv's v
    clip_errors: dict = field(default_factory=dict)  # weight name -> (error unclipped, clipped), summed over parts


def calibration_text(path: str | None) -> str:
    if path is None:
        from pydoc_data.topics import topics  # CPython's documentation topics: English text on every machine

        return "\n\n".join(topics[k] for k in sorted(topics))
    if not os.path.isfile(path):
        raise UserError(f"--calib_file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise UserError(f"--calib_file {path} is empty; give a text file of at least one --calib_seq_len of tokens")
    return text


def calibration_samples(ids: list[int], samples: int, seq_len: int, source: str) -> list[list[int]]:
    """`samples` windows of seq_len tokens spread over the text (fewer if the text is short)."""
    if samples < 1 or seq_len < 2:
        raise UserError(f"--calib_samples must be >= 1 and --calib_seq_len >= 2, got {samples} and {seq_len}")
    if len(ids) < seq_len:
        raise UserError(f"the calibration text ({source}) has {len(ids)} tokens, shorter than one sample of "
                        f"--calib_seq_len {seq_len}; give a longer --calib_file or a smaller --calib_seq_len")
    windows = len(ids) // seq_len
    picks = sorted({round(i * (windows - 1) / max(samples - 1, 1)) for i in range(min(samples, windows))})
    return [ids[w * seq_len:(w + 1) * seq_len] for w in picks]


def calibration_ids(ckpt: Checkpoint, text: str) -> list[int]:
    """The text's token ids under the checkpoint's tokenizer as the engine will have it: its files copied
    as the converter copies them (a remote-code family's overrides applied), then read by AutoTokenizer."""
    from transformers import AutoTokenizer

    overrides = getattr(get_adapter(ckpt), "tokenizer_overrides", None)
    with tempfile.TemporaryDirectory(prefix="tp_awq_tokenizer-") as tmp:
        copy_tokenizer(ckpt, tmp, overrides)
        if not any(os.path.isfile(os.path.join(tmp, n)) for n in TOKENIZER_FILES):
            raise UserError(f"{ckpt.tokenizer_dir} has no tokenizer, which calibration (AWQ, SmoothQuant) needs to read its text")
        try:
            tok = AutoTokenizer.from_pretrained(tmp)
        except Exception as e:  # any loader failure: the checkpoint's tokenizer is unusable
            raise UserError(f"{ckpt.tokenizer_dir} has no usable tokenizer for calibration (AWQ, SmoothQuant) ({e})") from None
        return tok(text)["input_ids"]


def calibration_windows(ckpt: Checkpoint, calib_file: str | None, samples: int, seq_len: int) -> list[list[int]]:
    """The calibration text (--calib_file, or CPython's documentation) as `samples` windows of seq_len ids."""
    text = calibration_text(calib_file)
    budget = samples * seq_len * 12  # characters: enough for the samples at any tokenizer's rate
    ids = calibration_ids(ckpt, text if calib_file else text[:budget])
    return calibration_samples(ids, samples, seq_len, calib_file or "pydoc_data.topics")


class _Recorder:
    """One linear's calibration inputs: mean |x| per input channel over every token, and a sample of rows."""

    def __init__(self, seed: int):
        self.abs_sum, self.count, self.rows = None, 0, []
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        """One window's inputs (tokens, in)."""
        x = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, in)
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        keep = max(1, MAX_ROWS // 8)
        idx = torch.randperm(x.shape[0], generator=self.gen)[:keep]
        self.rows.append(x[idx])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat(self.rows)
        if rows.shape[0] > MAX_ROWS:
            rows = rows[torch.randperm(rows.shape[0], generator=self.gen)[:MAX_ROWS]]
        return self.abs_sum / self.count, rows


def layer_activations(tensors: dict, cfg: dict, windows: list[list[int]]):
    """Yields (i, {'qkv' | 'dense' | 'fc_gate' | 'proj': (mean |x| (in,), rows (n, in))}) for each decoder
    layer in order: its linears' inputs on the calibration windows, by the reference forward with the
    original float weights. Layer i's output, the input of layer i + 1, is computed in the same pass; between
    two layers only the hidden states (windows, seq_len, hidden) are kept."""
    ref = ReferenceDecoder(tensors, cfg)
    x = ref.embed(torch.tensor(windows))  # (windows, seq_len, hidden)
    for i in range(ref.cfg["num_hidden_layers"]):
        recorders = {key: _Recorder(seed=8 * i + k) for k, key in enumerate(LINEAR_INPUTS)}

        def record(key, y):  # y: (rows of a chunk, seq_len, in); each row is one window
            for window in y:
                recorders[key].add(window)

        x = ref.layer_forward(i, x, record=record, max_tokens=CHUNK_TOKENS)
        yield i, {key: r.result() for key, r in recorders.items()}


def collect_activations(model_dir, calib_file: str | None, samples: int, seq_len: int) -> dict:
    """{(layer, 'qkv' | 'dense' | 'fc_gate' | 'proj'): (mean |x| (in,), rows (n, in))} for every layer at once,
    for inspection and tests (search() takes them a layer at a time). model_dir: a path or a Checkpoint."""
    ckpt = open_checkpoint(model_dir) if isinstance(model_dir, str) else model_dir
    windows = calibration_windows(ckpt, calib_file, samples, seq_len)
    adapter = get_adapter(ckpt)
    fields = adapter.config()
    tensors = {ct.name: ct for ct in adapter.tensors(fields)}
    return {(i, key): v for i, acts in layer_activations(tensors, fields, windows) for key, v in acts.items()}


def _quant_error(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, scheme: qz.QuantScheme) -> float:
    """|| x W^T - (x / s) Q(W s)^T ||^2 / rows."""
    deq = qz.dequantize(qz.quantize_rtn(w * s, scheme)) / s
    return ((x @ (w - deq).t()) ** 2).sum().item() / x.shape[0]


def search_scale(w: torch.Tensor, mean_abs: torch.Tensor, x: torch.Tensor, scheme: qz.QuantScheme):
    """Best s = mean|x|^alpha (normalised) for weight w (out, in) fed rows x (n, in).
    Returns (s, alpha, rtn error, best error)."""
    w, x = w.float(), x.float()
    base = mean_abs.float().clamp(min=1e-8)
    rtn = _quant_error(w, x, torch.ones_like(base), scheme)
    best = (torch.ones_like(base), 0.0, rtn)
    for k in range(1, GRID):
        alpha = k / GRID
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = _quant_error(w, x, s, scheme)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], rtn, best[2]


def _group_errors(dw: torch.Tensor, x: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """err[o, g] = mean over tokens of (x_g dw[o, g]^T)^2. dw: (out, groups, group); x: (n, in)."""
    if gram is not None:  # (groups, group, group): out * in * group multiply-adds
        return torch.einsum("ogi,gij,ogj->og", dw, gram, dw)
    groups, g = dw.shape[1], dw.shape[2]  # wide groups (per channel): out * in * n instead
    xg = x.reshape(x.shape[0], groups, g).transpose(0, 1)  # (groups, n, group)
    part = torch.bmm(xg, dw.permute(1, 2, 0))  # (groups, n, out)
    return part.pow(2).mean(1).t()  # (out, groups)


_CODES = {"int8": (-128, 127), "int4": (0, 15)}


def _full_range(wg: torch.Tensor, scheme: qz.QuantScheme):
    """(lo, hi) (out, groups): the part of each group's range that quantize._round can represent.
    Zero points: [min, max] widened to hold 0. Symmetric int4 (Q4_0): M, the signed value of largest
    magnitude, maps to code 0 and code 15 reaches -7/8 M, so [M, -7/8 M] (ordered): clamping there
    changes nothing, and keeps M's sign the largest magnitude once both ends are shrunk. int8: [-m, m]."""
    if scheme.zero_point:
        return wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    if scheme.precision == "int8":
        m = wg.abs().amax(-1)
        return -m, m
    big = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)  # M (out, groups)
    other = big * (-7 / 8)
    return torch.minimum(big, other), torch.maximum(big, other)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, scheme: qz.QuantScheme):
    """quantize._round's scale and zero for groups whose range is exactly [lo, hi] (as _full_range
    shrunk by a ratio gives): the same operations, so the same floats, at (out, groups) cost."""
    lo_code, hi_code = _CODES[scheme.precision]
    if scheme.zero_point:
        scale = (hi - lo) / (hi_code - lo_code)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, (torch.round(-lo / scale) + lo_code).clamp(lo_code, hi_code)
    if scheme.precision == "int8":
        scale = hi / 127
    else:
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8  # M
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.full_like(scale, 0 if scheme.precision == "int8" else 8)


def search_clip(w: torch.Tensor, x: torch.Tensor, scheme: qz.QuantScheme):
    """Per (row, group) clip range for weight w (out, in) fed rows x (n, in), both as the engine will
    have them (AWQ-scaled). Returns lo, hi (out, groups) to clamp w to, and the output error
    || x W^T - x Q(W)^T ||^2 / rows without and with the clip."""
    w, x = w.float(), x.float()
    out_f, in_f = w.shape
    g = in_f if scheme.group_size == -1 else scheme.group_size
    wg = w.reshape(out_f, in_f // g, g)  # (out, groups, group)
    gram = None
    if g <= x.shape[0]:
        xg = x.reshape(x.shape[0], in_f // g, g).transpose(0, 1)  # (groups, n, group)
        gram = xg.transpose(1, 2) @ xg / x.shape[0]  # (groups, group, group)
    lo0, hi0 = _full_range(wg, scheme)
    best_err, best_r = None, torch.ones_like(hi0)
    for k in range(round(CLIP_GRID * CLIP_MAX_SHRINK)):
        r = 1 - k / CLIP_GRID
        lo, hi = lo0 * r, hi0 * r
        scale, zero = _scale_zero(lo, hi, scheme)  # (out, groups): _round's, of the clamped group
        clipped = torch.clamp(wg, lo.unsqueeze(-1), hi.unsqueeze(-1))
        q = (torch.round(clipped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(*_CODES[scheme.precision])
        dw = (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - wg  # (out, groups, group)
        err = _group_errors(dw, x, gram)  # (out, groups)
        if best_err is None:
            best_err, dw_full = err, dw
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    lo, hi = lo0 * best_r, hi0 * best_r
    clipped = torch.clamp(wg, lo.unsqueeze(-1), hi.unsqueeze(-1)).reshape(out_f, in_f)
    dw_clip = qz.dequantize(qz.quantize_rtn(clipped, scheme)) - w
    before = (x @ dw_full.reshape(out_f, in_f).t()).pow(2).sum().item() / x.shape[0]
    after = (x @ dw_clip.t()).pow(2).sum().item() / x.shape[0]
    return lo, hi, before, after


def _clip_layer(res: AwqResult, tensors: dict, names: list, rows: torch.Tensor, s, scheme) -> None:
    """Clip search for one layer group's weights, as transform() will hand them to the quantizer."""
    x = rows if s is None else rows / s  # the linear's input once the scale is folded in
    for n in names:
        t = transform(n, tensors[n].load(False), res)
        parts = t if isinstance(t, tuple) else (t,)
        res.clip[n], errs = {}, [0.0, 0.0]
        for i, part in enumerate(parts):
            if isinstance(t, tuple) and i < 2:  # q and k of (q, k, v): AutoAWQ's avoid_clipping
                continue
            lo, hi, before, after = search_clip(part, x, scheme)
            if after < before:  # groups chosen one by one can add up worse (their cross terms): then none
                res.clip[n][i] = (lo, hi)
            else:
                after = before
            errs[0] += before
            errs[1] += after
        res.clip_errors[n] = tuple(errs)


def search(model_dir, ckpt_tensors: dict, cfg: dict, scheme: qz.QuantScheme, calib_file: str | None,
           samples: int, seq_len: int, progress: bool = False, clip: bool = True, acts: dict | None = None
           ) -> AwqResult:
    """model_dir: the checkpoint (a path or a Checkpoint), whose tokenizer reads the calibration text;
    ckpt_tensors: engine name -> CanonicalTensor (global, unsharded); cfg: the canonical config fields.
    clip: also search the clipping ranges; acts: collect_activations' result, when already at hand.
    Layer by layer: calibrate layer i on the reference forward, search its scales and clips, carry on."""
    layers = cfg["num_hidden_layers"]
    if acts is None:
        ckpt = open_checkpoint(model_dir) if isinstance(model_dir, str) else model_dir
        windows = calibration_windows(ckpt, calib_file, samples, seq_len)
        per_layer = layer_activations(ckpt_tensors, cfg, windows)
    else:
        per_layer = ((i, {key: acts[(i, key)] for key in LINEAR_INPUTS}) for i in range(layers))
    res = AwqResult()
    from tqdm import tqdm

    for i, layer_acts in tqdm(per_layer, total=layers, desc="AWQ calibration + search", unit="layer",
                              disable=not progress):
        search_layer(res, i, layer_acts, ckpt_tensors, cfg, scheme, clip)
    return res


def search_layer(res: AwqResult, i: int, acts: dict, ckpt_tensors: dict, cfg: dict, scheme: qz.QuantScheme,
                 clip: bool = True) -> None:
    """Layer i's scales (and clips) into res, from its four linear groups' calibration inputs `acts`."""
    p = ef.layer_prefix(i)
    pre_norm = cfg.get("norm_placement", "pre") == "pre"
    gated = cfg.get("gated_mlp", True)
    no_gqa = cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    groups = [("qkv", [f"{p}.attention.qkv.weight"]), ("dense", [f"{p}.attention.dense.weight"]),
              ("fc_gate", [f"{p}.mlp.fc.weight"] + ([f"{p}.mlp.gate.weight"] if gated else [])),
              ("proj", [f"{p}.mlp.proj.weight"])]
    chosen = {}
    for key, names in groups:
        ws = []
        for n in names:
            t = ckpt_tensors[n].load(False)
            ws.extend(t if isinstance(t, tuple) else [t])
        mean_abs, rows = acts[key]
        s, alpha, err_rtn, err_awq = search_scale(torch.cat(ws), mean_abs, rows, scheme)
        del ws, t
        res.alphas[f"{p}.{key}"] = alpha
        res.errors[f"{p}.{key}"] = (err_rtn, err_awq)
        chosen[key] = (names, rows, None if alpha == 0.0 else s)
        if alpha == 0.0:
            continue
        for n in names:
            res.col_scale[n] = s
        if key == "qkv" and pre_norm:
            _fold(res, ckpt_tensors, f"{p}.input_layernorm", s)
        elif key == "fc_gate" and pre_norm:
            _fold(res, ckpt_tensors, f"{p}.post_layernorm", s)
        elif key == "proj" and gated:
            res.row_div[f"{p}.mlp.gate.weight"] = s
            if f"{p}.mlp.gate.bias" in ckpt_tensors:
                res.row_div[f"{p}.mlp.gate.bias"] = s
        elif key == "dense" and no_gqa:
            res.qkv_v_div[f"{p}.attention.qkv.weight"] = s
            if f"{p}.attention.qkv.bias" in ckpt_tensors:
                res.qkv_v_div[f"{p}.attention.qkv.bias"] = s
        else:
            for n in names:
                res.prequant[n] = 1.0 / s
    if clip:  # after the layer's scales: v's rows (dense's scale) and gate's rows (proj's) are final
        for names, rows, s in chosen.values():
            _clip_layer(res, ckpt_tensors, names, rows, s, scheme)


def _fold(res: AwqResult, tensors: dict, norm: str, s: torch.Tensor) -> None:
    res.row_div[f"{norm}.weight"] = s
    if f"{norm}.bias" in tensors:
        res.row_div[f"{norm}.bias"] = s


def transform(name: str, tensor, res: AwqResult):
    """Apply the AWQ scales to one canonical tensor (a tensor, or (q, k, v) for qkv) as it is loaded."""
    if name in res.qkv_v_div:  # v's rows (its outputs are dense's inputs)
        q, k, v = tensor
        s = res.qkv_v_div[name]
        v = v / (s.view(-1, *([1] * (v.dim() - 1))) if v.dim() > 1 else s)
        tensor = (q, k, v.to(q.dtype))
    if name in res.col_scale:
        s = res.col_scale[name]
        tensor = tuple(t * s for t in tensor) if isinstance(tensor, tuple) else tensor * s
    if name in res.row_div:
        s = res.row_div[name]
        tensor = tensor / (s.view(-1, 1) if tensor.dim() > 1 else s)
    if name in res.clip:
        parts = list(tensor) if isinstance(tensor, tuple) else [tensor]
        for i, (lo, hi) in res.clip[name].items():
            w = parts[i]
            g = w.shape[1] // lo.shape[1]
            wg = w.float().reshape(w.shape[0], lo.shape[1], g)  # (out, groups, group)
            parts[i] = torch.clamp(wg, lo.unsqueeze(-1), hi.unsqueeze(-1)).reshape(w.shape).to(w.dtype)
        tensor = tuple(parts) if isinstance(tensor, tuple) else parts[0]
    return tensor
