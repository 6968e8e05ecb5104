"""Weight-only quantization: round-trip error bounds per scheme, quantized shards against the float
partition rules, every available kernel against the dequantized reference matmul, quantized engines
against transformers at tp 1 and 2, tp-plan's exact figures, and the bad-input errors."""

import os

import pytest
import torch

from helpers import build_checkpoint, random_prompts, reference_logprobs, run_ranks, tool, tp_run_json
from tp_runtime import engine_format as ef
from tp_runtime import partition as pt
from tp_runtime import quantize as qz
from tp_runtime import woq
from tp_runtime.adapters import COLUMN, QKV, ROW_ATTN, ROW_MLP, VOCAB
from tp_runtime.convert import convert, row_span, shard_tensor
from tp_runtime.errors import UserError
from tp_runtime.plan import plan

SCHEMES = {
    "int8": qz.QuantScheme("int8", -1),
    "int8_zp": qz.QuantScheme("int8", -1, zero_point=True),
    "int4_g32": qz.QuantScheme("int4", 32),
    "int4_g64_zp": qz.QuantScheme("int4", 64, zero_point=True),
    "int4_channel": qz.QuantScheme("int4", -1),
}


def weight(out_f=48, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier, and a row of one sign, stress the scale / zero choice
    w[5] = w[5].abs() + 0.01
    return w


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TP_RUNTIME_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_round_trip_error_within_half_a_step(name):
    scheme = SCHEMES[name]
    w = weight()
    qw = qz.quantize_rtn(w, scheme)
    deq = qz.dequantize(qw)
    g = w.shape[1] if scheme.group_size == -1 else scheme.group_size
    step = qw.scale.abs().repeat_interleave(g, dim=1)  # (out, in): each weight's own scale
    # Round to nearest: half a step; symmetric int4 (Q4_0) clips the far side of the largest magnitude
    # to code 15, one step at most.
    bound = step * (1.0 if name in ("int4_g32", "int4_channel") else 0.5)
    assert ((w - deq).abs() <= bound + 1e-7).all()
    lo, hi = (-128, 127) if scheme.precision == "int8" else (0, 15)
    assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    rel = (w - deq).norm() / w.norm()
    assert rel < (0.01 if scheme.precision == "int8" else 0.2), rel
    if scheme.precision == "int4":
        assert torch.equal(ef.unpack_int4(ef.pack_int4(qw.q)), qw.q)
    # what the rank file holds reads back as the same weight
    back = qz.from_engine_tensors("x.weight", dict(qz.engine_tensors("x.weight", qw)), scheme.precision)
    assert torch.equal(qz.dequantize(back), deq)


@pytest.mark.parametrize("name", ["int8_zp", "int4_g32", "int4_g64_zp"])
def test_quantized_shards_are_the_float_rules_on_the_dequantized_weight(name):
    """Every rule, both ranks (uneven split: 3 KV groups on 2 ranks): the shard of the codes / scales /
    zeros dequantizes to the float rule's shard of the dequantized weight, and the row shards' codes and
    scales concatenate back to the whole."""
    scheme = SCHEMES[name]
    head_dim, heads, kv_heads, inter, hidden = 64, 6, 3, 256, 128
    plans = pt.plan_ranks(heads, kv_heads, inter, 2)
    cases = {
        QKV: tuple(weight(n * head_dim, hidden, seed) for seed, n in enumerate((heads, kv_heads, kv_heads))),
        COLUMN: weight(inter, hidden, 3),
        ROW_ATTN: weight(hidden, heads * head_dim, 4),
        ROW_MLP: weight(hidden, inter, 5),
        VOCAB: weight(101, hidden, 6),
    }
    for rule, w in cases.items():
        qw = tuple(qz.quantize_rtn(t, scheme) for t in w) if rule == QKV else qz.quantize_rtn(w, scheme)
        deq = tuple(qz.dequantize(t) for t in qw) if rule == QKV else qz.dequantize(qw)
        shards = []
        for p in plans:
            part = qz.shard_quantized(rule, qw, p, head_dim, row_span(rule, p, head_dim))
            assert torch.equal(qz.dequantize(part), shard_tensor(rule, deq, p, head_dim)), (rule, p.rank)
            shards.append(part)
        if rule in (ROW_ATTN, ROW_MLP):
            assert torch.equal(torch.cat([s.q for s in shards], 1), qw.q)
            if scheme.group_size != -1:
                assert torch.equal(torch.cat([s.scale for s in shards], 1), qw.scale)
        if rule == COLUMN:
            assert torch.equal(torch.cat([s.scale for s in shards]), qw.scale)


def quant_weight(scheme, out_f, in_f, seed, prequant=False):
    qw = qz.quantize_rtn(weight(out_f, in_f, seed), scheme)
    codes = qw.q if scheme.precision == "int8" else qw.q
    pre = torch.rand(in_f, generator=torch.Generator().manual_seed(seed)) + 0.5 if prequant else None
    return woq.QuantWeight(scheme.precision, codes, qw.scale, qw.zero, pre)


@pytest.mark.parametrize("name", ["int8", "int8_zp", "int4_g32", "int4_g64_zp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_available_kernel_matches_the_dequantized_matmul(name, dtype):
    scheme = SCHEMES[name]
    for out_f, in_f in ((48, 128), (192, 576)):
        qw = quant_weight(scheme, out_f, in_f, 1, prequant=name.endswith("zp"))
        x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(2))  # different data per row
        ref = x @ qw.dequantize().t()
        names = woq.candidates(qw, dtype)
        assert {"dequant_int8", "dequant_int4"} & set(names)
        for kname in names:
            qw.kernel, qw.dtype = kname, dtype
            layer = woq.WeightOnlyLinear(qw)
            assert layer.kernel_name == kname
            y = layer(x.to(dtype).view(5, 1, in_f)).float().view(5, out_f)
            # bf16 activations round x to 8 bits of mantissa; FBGEMM quantizes x to 8 bits per call
            approx = dtype == torch.bfloat16 or kname.endswith("_bf16") or kname == "fbgemm_int8"
            tol = 3e-2 if approx else 1e-4
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (name, dtype, kname, out_f, in_f, err)


def test_auto_choice_is_timed_once_and_cached(tmp_path):
    qw = quant_weight(SCHEMES["int8"], 64, 128, 0)
    woq._chosen.clear()
    name = woq.choose(qw, torch.float32)
    assert name in woq.candidates(qw, torch.float32)
    import json
    with open(woq.cache_path()) as f:
        assert json.load(f)[woq.cache_key(qw, torch.float32)] == name
    qw.kernel = "aten_int4_cpu"  # a kernel of the other precision does not apply to this weight
    assert woq.choose(qw, torch.float32) == name
    qw.kernel = "nope"
    with pytest.raises(UserError, match="unknown"):
        woq.choose(qw, torch.float32)


# ---------------------------------------------------------------------------
# engines


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model = build_checkpoint(str(root / "hf"), "llama", intermediate_size=128, tie_word_embeddings=True)
    return root, model


def logprob_gap(model, out, prompts):
    gaps = []
    for p, o in zip(prompts, out["outputs"]):
        assert o["input_ids"] == p and len(o["output_ids"]) == 6
        ref = reference_logprobs(model, p, o["output_ids"])
        gaps.append(max(abs(a - b) for a, b in zip(ref, o["output_logprobs"])))
    return max(gaps)


def run_engine(engine, tp, prompts, extra=()):
    return tp_run_json(engine, tp, ["--input_ids", *(",".join(map(str, p)) for p in prompts),
                                    "--max_output_len", "6", "--ignore_eos", *extra],
                       env_extra={"TP_RUNTIME_CACHE": os.environ["TP_RUNTIME_CACHE"]})


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_engine_logprobs_close_to_fp32(ckpt, tp, tmp_path):
    root, model = ckpt
    engine = str(tmp_path / "e")
    convert(str(root / "hf"), engine, tp, progress=False, quant=qz.parse_scheme("int8", quantize_lm_head=tp == 2))
    prompts = random_prompts(103, seed=tp)
    out = run_engine(engine, tp, prompts, ["--woq_kernel", "aten_int8_bf16" if tp == 1 else "auto"])
    assert logprob_gap(model, out, prompts) <= 0.05
    out = run_engine(engine, tp, prompts, ["--woq_kernel", "fbgemm_int8"])
    assert logprob_gap(model, out, prompts) <= 0.05


def test_int4_g32_engine_runs_at_tp2(ckpt, tmp_path):
    root, model = ckpt
    engine = str(tmp_path / "e")
    convert(str(root / "hf"), engine, 2, progress=False, quant=qz.parse_scheme("int4", 32, zero_point=True))
    raw = ef.EngineConfig.load(engine).quantization
    assert raw["quant_algo"] == "W4A16" and raw["group_size"] == 32 and raw["has_zero_point"]
    prompts = random_prompts(103, seed=5)
    out = run_engine(engine, 2, prompts)
    # 4 bits on a random model: close to the float model's probabilities, though not within int8's margin
    assert logprob_gap(model, out, prompts) <= 0.5
    ref = run_engine(engine, 2, prompts, ["--woq_kernel", "dequant_int4"])  # the fallback agrees
    for a, b in zip(out["outputs"], ref["outputs"]):
        assert max(abs(x - y) for x, y in zip(a["output_logprobs"], b["output_logprobs"])) < 0.02


def test_plan_is_exact_for_quantized_engines(tmp_path):
    from test_plan import data_bytes, family_config
    from tp_runtime.synthetic import write_synthetic

    cfg = dict(family_config("llama"), intermediate_size=128)
    write_synthetic(cfg, str(tmp_path / "hf"), dtype="float32", progress=False)
    for precision, group in (("int8", None), ("int4", 32)):
        engine = str(tmp_path / precision)
        convert(str(tmp_path / "hf"), engine, 2, progress=False, max_seq_len=64,
                quant=qz.parse_scheme(precision, group))
        report = plan(cfg, 2, "float32", precision=precision, group_size=group, max_seq_len=64)
        for r in report["ranks"]:
            assert r["weight_bytes"] == data_bytes(os.path.join(engine, f"rank{r['rank']}.safetensors"))


def test_bad_quantization_input(ckpt, tmp_path):
    root, _ = ckpt
    hf = str(root / "hf")

    def convert_cli(*flags, code=2):
        res = run_ranks(1, [tool("tp-convert"), "--model_dir", hf, "--output_dir", str(tmp_path / "x"),
                            "--no_progress", *flags], timeout=120)
        assert "Traceback" not in res.stderr, res.stderr
        assert res.returncode == code, (res.returncode, res.stderr)
        return res.stderr

    # dense's 64 inputs on 2 ranks: 32 each; group 64 divides the whole but not a rank's slice
    err = convert_cli("--tp_size", "2", "--use_weight_only", "--weight_only_precision", "int4", "--group_size", "64")
    assert "does not divide" in err and "attention.dense" in err and "[32, 32] per rank at tp_size=2" in err
    assert "valid group sizes: 32, -1" in err
    err = convert_cli("--use_weight_only", "--quant_algo", "gptq")
    assert "--quant_algo 'gptq' is unknown" in err and "rtn" in err
    err = convert_cli("--use_weight_only", "--weight_only_precision", "int8", "--group_size", "64")
    assert "per channel" in err
    err = convert_cli("--weight_only_precision", "int4")
    assert "need --use_weight_only" in err
    build_checkpoint(str(tmp_path / "odd"), "llama", intermediate_size=97)
    res = run_ranks(1, [tool("tp-convert"), "--model_dir", str(tmp_path / "odd"), "--output_dir",
                        str(tmp_path / "y"), "--use_weight_only", "--weight_only_precision", "int4",
                        "--group_size", "-1", "--no_progress"], timeout=120)
    assert res.returncode == 2 and "odd input width" in res.stderr and "Traceback" not in res.stderr
    engine = str(tmp_path / "e8")
    convert(hf, engine, 1, progress=False, quant=qz.parse_scheme("int8"))
    res = run_ranks(1, [tool("tp-run"), "--engine", engine, "--input_ids", "5,6", "--woq_kernel", "fast"],
                    timeout=120)
    assert res.returncode == 2 and "--woq_kernel 'fast' is unknown" in res.stderr and "Traceback" not in res.stderr
    res = run_ranks(1, [tool("tp-run"), "--engine", engine, "--input_ids", "5,6", "--woq_kernel", "aten_int4_cpu",
                        "--max_output_len", "2"], timeout=120)
    assert res.returncode == 0  # an int4 kernel forced on an int8 engine serves nothing and changes nothing
