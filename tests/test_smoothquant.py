"""SmoothQuant (W8A8): the smoothing fold, the engine against an independent fake-quantized reference at tp 1 and
2, the int8 x int8 kernel on odd shapes at both ISA levels, and the command line's mistakes."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_engine_matches, build_checkpoint, build_outlier_checkpoint, cli_in_process, random_prompts
from tp_runtime.convert import quantize as qz
from tp_runtime.convert import smoothquant
from tp_runtime.convert.adapters import get_adapter
from tp_runtime.convert.awq import transform
from tp_runtime.convert.checkpoint import open_checkpoint
from tp_runtime.convert.pipeline import convert

# canonical name -> transformers' Llama name, per layer (qkv is three)
HF_NAMES = {"input_layernorm.weight": "input_layernorm.weight", "post_layernorm.weight": "post_attention_layernorm.weight",
            "attention.dense.weight": "self_attn.o_proj.weight", "mlp.fc.weight": "mlp.gate_proj.weight",
            "mlp.gate.weight": "mlp.up_proj.weight", "mlp.proj.weight": "mlp.down_proj.weight"}
CALIB = dict(calib_samples=4, calib_seq_len=48)


@pytest.fixture(scope="module")
def sq_ckpt(tmp_path_factory):
    """Tiny Llama with GQA (4 heads, 2 KV heads) and activation outliers (a few large norm channels), a char
    tokenizer for the calibration text."""
    root = tmp_path_factory.mktemp("sq")
    return root, build_outlier_checkpoint(str(root / "hf"))


def _smoothed_state(hf_dir: str, res) -> dict:
    """transformers' state dict with the smoothing transforms applied to the canonical tensors."""
    ckpt = open_checkpoint(hf_dir)
    adapter = get_adapter(ckpt)
    tensors = {ct.name: ct for ct in adapter.tensors(adapter.config())}
    state = {}
    for name, ct in tensors.items():
        if not name.startswith("transformer.layers."):
            continue
        i, suffix = name.split(".", 3)[2], name.split(".", 3)[3]
        t = transform(name, ct.load(False), res)
        if suffix == "attention.qkv.weight":
            for proj, part in zip("qkv", t, strict=True):
                state[f"model.layers.{i}.self_attn.{proj}_proj.weight"] = part
        else:
            state[f"model.layers.{i}.{HF_NAMES[suffix]}"] = t
    return state


def _search(root, alpha=0.5):
    hf = str(root / "hf")
    ckpt = open_checkpoint(hf)
    adapter = get_adapter(ckpt)
    fields = adapter.config()
    tensors = {ct.name: ct for ct in adapter.tensors(fields)}
    return smoothquant.search(ckpt, tensors, fields, alpha, None, CALIB["calib_samples"], CALIB["calib_seq_len"])


def test_smoothing_folds_leave_the_float_model_unchanged(sq_ckpt):
    """Smoothed weights (norms / v / up divided by s, columns times s), run by transformers' own Llama, give the
    original model's logits; the scales are far from 1 on the outlier channels, so the check could fail."""
    root, model = sq_ckpt
    res, steps = _search(root)
    s = res.col_scale["transformer.layers.0.attention.qkv.weight"]
    assert s[[3, 17, 40]].min() > 3 * s.median()  # the outliers were migrated
    assert set(res.qkv_v_div) == {"transformer.layers.0.attention.qkv.weight", "transformer.layers.1.attention.qkv.weight"}
    dense_s = res.col_scale["transformer.layers.0.attention.dense.weight"].view(4, 16)  # (heads, D)
    assert torch.equal(dense_s[0], dense_s[1]) and torch.equal(dense_s[2], dense_s[3])  # one per v channel (GQA)
    assert not torch.equal(dense_s[0], dense_s[2])
    smoothed = type(model)(model.config).eval()
    smoothed.load_state_dict({**model.state_dict(), **_smoothed_state(str(root / "hf"), res)})
    assert not torch.equal(smoothed.model.layers[0].self_attn.v_proj.weight, model.model.layers[0].self_attn.v_proj.weight)
    ids = torch.tensor(random_prompts(103, seed=5, lengths=(12, 12, 12)))  # different tokens per row
    with torch.no_grad():
        a, b = model(ids).logits, smoothed(ids).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max(), (a - b).abs().max()
    assert all(v.shape == (1,) and v.item() > 0 for v in steps.values())


class _FakeQuantLinear(torch.nn.Module):
    """x rounded to int8 per token (or with a static step), W rounded per output channel (or per tensor): plain
    torch, written here from the SmoothQuant definition. parts: a row-parallel linear's input slices at tp > 1,
    which each rank rounds with its own per-token step (it holds only its slice of x)."""

    def __init__(self, w: torch.Tensor, w_step: torch.Tensor, act_step: torch.Tensor | None, parts: int = 1):
        super().__init__()
        self.w = torch.round(w / w_step).clamp(-127, 127) * w_step
        self.act_step, self.parts = act_step, parts

    def forward(self, x):
        xs = []
        for xp in x.chunk(self.parts, dim=-1):  # the tiny model's splits are even
            step = xp.abs().amax(-1, keepdim=True) / 127 if self.act_step is None else self.act_step
            xs.append(torch.round(xp / step).clamp(-127, 127) * step)
        return F.linear(torch.cat(xs, -1), self.w)


def _reference(model, root, per_channel: bool, per_token: bool, tp: int):
    """The float model smoothed as the converter smooths it (same calibration), every linear of the layers
    fake-quantized; q, k, v share one step when per tensor."""
    res, steps = _search(root)
    ref = type(model)(model.config).eval()
    ref.load_state_dict({**model.state_dict(), **_smoothed_state(str(root / "hf"), res)})
    for i, layer in enumerate(ref.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        groups = {"attention.qkv": [(att, "q_proj"), (att, "k_proj"), (att, "v_proj")],
                  "attention.dense": [(att, "o_proj")], "mlp.fc": [(mlp, "gate_proj")], "mlp.gate": [(mlp, "up_proj")],
                  "mlp.proj": [(mlp, "down_proj")]}
        for name, mods in groups.items():
            ws = [getattr(m, a).weight.data for m, a in mods]
            whole = torch.stack([w.abs().max() for w in ws]).max() / 127
            act = None if per_token else steps[f"transformer.layers.{i}.{name}.weight"]
            for (m, a), w in zip(mods, ws, strict=True):
                step = w.abs().amax(1, keepdim=True) / 127 if per_channel else whole
                setattr(m, a, _FakeQuantLinear(w, step, act, tp if name in ("attention.dense", "mlp.proj") else 1))
    return ref


@pytest.mark.parametrize("tp,per_channel,per_token", [(1, True, True), (2, True, True), (2, False, False)])
def test_engine_matches_a_fake_quantized_reference(sq_ckpt, tmp_path, tp, per_channel, per_token):
    """Greedy ids equal and log-probs within 1e-3 of the reference: the engine's integer sums are exact, so it
    differs from the reference only by float summation order (and a code that order flips at a rounding tie)."""
    root, model = sq_ckpt
    engine = str(tmp_path / "e")
    quant = qz.QuantScheme("int8", -1, algo="sq", sq_alpha=0.5, sq_per_channel=per_channel, sq_per_token=per_token)
    cfg = convert(str(root / "hf"), engine, tp, progress=False, quant=quant, **CALIB)
    assert cfg.quantization["quant_algo"] == smoothquant.quant_algo(per_channel, per_token)
    assert cfg.quantization["weight_only_modules"] == []
    ref = _reference(model, root, per_channel, per_token, tp)
    prompts = random_prompts(103, seed=tp + 2 * per_token)
    assert_engine_matches(ref, engine, tp, prompts, new_tokens=6, label="sq")
    # and the reference is not the float model: W8A8 moves its log-probs by several times that tolerance
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        gap = (F.log_softmax(ref(ids).logits, -1) - F.log_softmax(model(ids).logits, -1)).abs().max()
    assert gap > 3e-3, gap


W8A8_CHECK = r"""
import torch, tp_runtime
from tp_runtime.runtime.woq import QuantWeight
from tp_runtime.runtime.woq.kernels import KERNELS
from tp_runtime.runtime.woq.format import fake_quant_act
torch.manual_seed(0)
for rows, in_f, out_f in [(1, 45, 7), (3, 200, 33), (17, 577, 130), (17, 1000, 64)]:
    q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8)
    q[0] = 127  # full-range codes: a saturating 16-bit pair sum would show
    scale = torch.rand(out_f, 1) + 0.1
    x = torch.randn(rows, in_f) * torch.linspace(0.5, 4, rows).unsqueeze(1)  # different per row
    x[:, 0] = 9.0
    for act in (None, torch.tensor([0.05])):
        w = QuantWeight("w8a8", q, scale, None, act_scale=act)
        ref = (fake_quant_act(x, act).double() @ q.double().t()) * scale[:, 0].double()
        for name in ("native_w8a8", "dequant_w8a8"):
            assert KERNELS[name].supports(w, torch.float32), name  # builds the native kernels
            k = KERNELS[name](w, torch.float32)
            for n in (rows, 24 if rows == 17 else rows):  # 24 rows: the prefill path
                xi = x if n == rows else x.repeat(2, 1)[:n]
                r = ref if n == rows else ref.repeat(2, 1)[:n]
                err = ((k(xi).double() - r).abs().max() / r.abs().max()).item()
                assert err < 1e-5, (name, rows, in_f, out_f, act, n, err)
print("ok")
"""


@pytest.mark.parametrize("isa", [None, "avx2"])
def test_w8a8_kernels_on_odd_shapes(isa):
    """Every w8a8 kernel against float64 on codes rounded here: widths not a multiple of 16 or 64, 1, 3, 17 and 24
    rows, per token and static; as this CPU runs them and capped to AVX2 (oneDNN and torch capped too)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.pop("TP_RUNTIME_ISA", None)
    if isa:
        env["TP_RUNTIME_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", W8A8_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_smoothquant_command_line_mistakes(sq_ckpt, tmp_path, capsys):
    from tp_runtime.cli import convert as convert_main

    root, _ = sq_ckpt
    out_dir = tmp_path / "x"

    def convert_cli(*flags, model=str(root / "hf")):  # one line, status 2, no engine left behind
        rc, err = cli_in_process(convert_main.main, ["--model_dir", model, "--output_dir", str(out_dir),
                                                     "--no_progress", *flags], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (rc, err)
        assert not out_dir.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
        return err

    assert "in [0, 1]" in convert_cli("--smoothquant", "1.5")
    assert "in [0, 1]" in convert_cli("--smoothquant", "-0.1")
    assert "--use_weight_only" in convert_cli("--smoothquant", "0.5", "--use_weight_only")
    assert "need --smoothquant" in convert_cli("--per_token")
    assert "does not exist" in convert_cli("--smoothquant", "0.5", "--calib_file", str(tmp_path / "nope.txt"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "shorter than one sample" in convert_cli("--smoothquant", "0.5", "--calib_file", str(short))
    bare = tmp_path / "bare"  # a checkpoint without a tokenizer: no calibration text can be read
    build_checkpoint(str(bare), "llama")
    capsys.readouterr()  # transformers' own progress output
    assert "has no tokenizer" in convert_cli("--smoothquant", "0.5", model=str(bare))
