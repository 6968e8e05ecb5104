"""Weight-only quantization: round-trip error bounds per scheme, quantized shards against the float
partition rules, every available kernel against the dequantized reference matmul, quantized engines
against transformers at tp 1 and 2, tp-plan's exact figures, and the bad-input errors."""

import json
import os

import pytest
import torch

from helpers import (build_checkpoint, build_outlier_checkpoint, cli_in_process, random_prompts, reference_logprobs,
                     run_ranks, save_char_tokenizer, tool, tp_run_json)
from tp_runtime import cpu
from tp_runtime.engine import format as ef
from tp_runtime.convert import partition as pt
from tp_runtime.convert import quantize as qz
from tp_runtime.runtime import woq
from tp_runtime.convert.adapters import get_adapter
from tp_runtime.convert.partition import COLUMN, QKV, ROW_ATTN, ROW_MLP, VOCAB
from tp_runtime.convert.partition import row_span, shard_tensor
from tp_runtime.convert.pipeline import convert
from tp_runtime.errors import UserError
from tp_runtime.cli.plan import plan

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


@pytest.fixture(params=cpu.levels_available() or ["none"])
def isa(request, monkeypatch):
    """Each ISA level this CPU can serve in turn (TP_RUNTIME_ISA): tp_runtime's own choices follow it (bf16
    variants, the native dot instruction); torch's kernels keep the capability the process started with."""
    if request.param != "none":
        monkeypatch.setenv("TP_RUNTIME_ISA", request.param)
    from tp_runtime.runtime import native
    if native.load():
        native.follow_isa()
    yield request.param
    monkeypatch.delenv("TP_RUNTIME_ISA", raising=False)
    if native.load():
        native.follow_isa()


@pytest.mark.parametrize("name", ["int8", "int8_zp", "int4_g32", "int4_g64_zp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_available_kernel_matches_the_dequantized_matmul(name, dtype, isa):
    scheme = SCHEMES[name]
    for out_f, in_f in ((48, 128), (192, 576)):
        qw = quant_weight(scheme, out_f, in_f, 1, prequant=name.endswith("zp"))
        rows = 5 if in_f == 128 else 40  # 40: beyond aten_int8's GEMM threshold (prefill)
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(2))  # different data per row
        ref = x @ qw.dequantize().t()
        names = woq.candidates(qw, dtype)
        assert {"dequant_int8", "dequant_int4"} & set(names)
        for kname in names:
            qw.kernel, qw.dtype = kname, dtype
            layer = woq.WeightOnlyLinear(qw)
            assert layer.kernel_name == kname
            y = layer(x.to(dtype).view(rows, 1, in_f)).float().view(rows, out_f)
            # bf16 activations round x to 8 bits of mantissa; FBGEMM and native_int4_q8 (decode rows) round x
            # to 8-bit (FBGEMM without VNNI: 7-bit) integers per call (the latter exactly checked below)
            approx = (dtype == torch.bfloat16 or kname.endswith("_bf16") or kname in ("fbgemm_int8", "native_int4_q8"))
            tol = 3e-2 if approx else 1e-4
            assert woq.select.tolerance(kname, dtype) <= tol  # what the load-time probe allows
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (name, dtype, kname, out_f, in_f, err, isa)


def need_native():
    """tp_runtime's AVX2 kernels: skip where the CPU cannot run them, else they must build here."""
    from tp_runtime.runtime import native
    if not cpu.has("avx2", "fma"):
        pytest.skip("the CPU lacks AVX2/FMA: the native kernels are not candidates here")
    assert native.load(), native.why_not()


def test_native_kernels_build_here_and_match_for_every_row_count():
    """tp_runtime's AVX2 kernels: built on this machine (AVX2 and a compiler are there), exact against the
    dequantized matmul for 1..9 activation rows (2- and 4-row passes and their remainders) and prefill rows,
    different data per row, symmetric and zero-point weights, groups 32 / 64 / per channel."""
    need_native()
    for name, (out_f, in_f) in (("int8", (72, 200)), ("int8_zp", (96, 576)), ("int4_g32", (40, 192)),
                                ("int4_g64_zp", (200, 576)), ("int4_channel", (33, 128))):
        qw = quant_weight(SCHEMES[name], out_f, in_f, 3, prequant=name.endswith("zp"))
        kname = f"native_{SCHEMES[name].precision}"
        assert kname in woq.candidates(qw, torch.float32, auto=True)
        qw.kernel = kname
        layer = woq.WeightOnlyLinear(qw)
        w = qw.dequantize()
        for rows in (1, 2, 3, 4, 5, 7, 9, 33):
            x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
            ref = x.double() @ w.double().t()
            y = layer(x).double()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-5, (name, rows, err)
    odd = quant_weight(SCHEMES["int4_g32"], 8, 96, 0)  # inputs not in blocks of 64: torch's kernels serve
    assert "native_int4" not in woq.candidates(odd, torch.float32)


def test_native_fp32_gemv_matches_for_decode_and_prefill_rows():
    """fp32 float linears on a CPU with the native kernels: (out, in) weights, tp_woq::f32_mm for up to
    NATIVE_ROWS activation rows (1-4 per weight pass and remainders), F.linear beyond; (B, T, in) inputs."""
    from tp_runtime.runtime.layers import NATIVE_ROWS, matmul, pack_weight

    need_native()
    for out_f, in_f in ((40, 200), (576, 1536), (7, 33)):  # widths that are not multiples of 32 take the tail
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f))
        packed, layout = pack_weight(w)
        assert layout == "native" and packed.shape == (out_f, in_f)
        for shape in ((1, 1), (2, 1), (3, 1), (5, 1), (1, NATIVE_ROWS), (2, 9), (1, 40)):
            x = torch.randn(*shape, in_f, generator=torch.Generator().manual_seed(sum(shape)))
            ref = x.double() @ w.double().t()
            y = matmul(x, packed, layout)
            assert y.shape == (*shape, out_f)
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-5, (out_f, in_f, shape, err)


def test_native_decode_attention_matches_softmax_attention():
    """tp_woq::decode_attn (one new token per row, read through its block table from the paged cache, the query
    heads of a KV head together) against softmax attention in float64 and the plain decode_attention: head sizes
    64 / 128 / 80, groups 1-4, spans that are and are not multiples of 8 or of the block, blocks in any order,
    per-row masks (a short row, a sliding window), large scores (the max is subtracted before exp)."""
    from tp_runtime.runtime.model import decode_attention, gather_blocks, native_decode_attention

    need_native()
    g = torch.Generator().manual_seed(0)
    for B, Hkv, G, D, S, bs in ((1, 3, 3, 64, 200, 16), (2, 2, 4, 128, 37, 8), (3, 1, 1, 80, 8, 3),
                                (1, 4, 2, 64, 1, 32)):
        nb = -(-S // bs) + 1  # a spare column: tables may be wider than the span
        pool_k = torch.randn(B * nb + 3, Hkv, bs, D, generator=g) * 3
        pool_v = torch.randn(B * nb + 3, Hkv, bs, D, generator=g)
        tables = torch.randperm(B * nb + 3, generator=g)[: B * nb].view(B, nb)
        keys, values = gather_blocks(pool_k, tables, S), gather_blocks(pool_v, tables, S)
        q = torch.randn(B, Hkv * G, 1, D, generator=g) * 3
        pos = torch.arange(S)
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        if B > 1:
            mask[1] = pos < max(1, S // 2)  # a row that is earlier in its sequence
        if B > 2:
            mask[2] = pos > S - 4  # a sliding window of 3
        ref = torch.softmax((q.double().reshape(B, Hkv, G, D) @ keys.double().transpose(-1, -2)) * D ** -0.5
                            + torch.where(mask.reshape(B, 1, 1, S), 0.0, float("-inf")), dim=-1) @ values.double()
        got = native_decode_attention(q, pool_k, pool_v, tables, mask)
        assert got.shape == (B, Hkv * G, 1, D)
        err = (got.double().reshape(B, Hkv, G, D) - ref).abs().max().item()
        assert err < 2e-5, (B, Hkv, G, D, S, err)
        assert (got - decode_attention(q, keys, values, mask)).abs().max().item() < 2e-5
    with pytest.raises(RuntimeError, match="not in the cache"):
        native_decode_attention(q, pool_k, pool_v, torch.full((B, nb), B * nb + 3), mask)


def test_native_int4_q8_rounds_activations_as_q8_0():
    """native_int4_q8 against a reference written from the scheme: each 32 inputs of a decode row become
    round(x / d) with d = max |x| / 127 (llama.cpp's Q8_0) and meet the dequantized weights (so the minimum
    meets the rounded inputs' sum); prefill rows (> 16) are exact. native_int4_q8x2 adds the
    rounding error as a second int8 part: within 1e-4 of the exact matmul. Different data per row; output
    rows not a multiple of the tile (8); every dot instruction this CPU has (VNNI, AVX-512 VNNI, AVX2)."""
    need_native()
    best = torch.ops.tp_woq.q8_isa(-1)
    try:
        for isa in range(best + 1):
            assert torch.ops.tp_woq.q8_isa(isa) == isa
            for name, (out_f, in_f) in (("int4_g32", (40, 192)), ("int4_g64_zp", (200, 576)),
                                        ("int4_g32", (33, 64))):
                qw = quant_weight(SCHEMES[name], out_f, in_f, 5)
                assert "native_int4_q8" in woq.candidates(qw, torch.float32)
                assert "native_int4_q8" not in woq.candidates(qw, torch.float32, auto=True)  # only when named
                assert "native_int4_q8x2" in woq.candidates(qw, torch.float32, auto=True)
                layers = {}
                for kname in ("native_int4_q8", "native_int4_q8x2"):
                    qw.kernel = kname
                    layers[kname] = woq.WeightOnlyLinear(qw)
                for rows in (1, 2, 3, 5, 33):
                    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(100 + rows))
                    blocks = x.double().view(rows, -1, 32)
                    d = blocks.abs().amax(-1, keepdim=True) / 127
                    xq = torch.round(blocks / d) * d if rows <= 16 else blocks  # prefill: exact
                    ref = xq.view(rows, in_f) @ qw.dequantize().double().t()
                    y = layers["native_int4_q8"](x).double()
                    assert y.shape == (rows, out_f)
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    assert err < 1e-5, (isa, name, rows, err)
                    exact = x.double() @ qw.dequantize().double().t()
                    y2 = layers["native_int4_q8x2"](x).double()
                    err2 = ((y2 - exact).abs().max() / exact.abs().max()).item()
                    assert err2 < 1e-4, (isa, name, rows, err2)
    finally:
        torch.ops.tp_woq.q8_isa(best)


def test_int4_tile_packing_round_trips():
    from tp_runtime.runtime import native
    q = torch.randint(0, 16, (24, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tiles = native.pack_int4_tiles(q)
    assert tiles.shape == (3, 3, 128)
    assert torch.equal(native.unpack_int4_tiles(tiles), q)
    # row 1's inputs 4..7 sit in bytes 4..7 of the block's second vector (low nibbles), 20..23 above them
    assert torch.equal(tiles[0, 0, 32 + 4 : 32 + 8] & 15, q[1, 4:8])
    assert torch.equal(tiles[0, 0, 32 + 4 : 32 + 8] >> 4, q[1, 20:24])


class _Off(woq.kernels.DequantInt8):
    """A deliberately wrong kernel: 5 % too large, as a saturating dot would be on some CPU."""

    name = "off_int8"

    def forward(self, x):
        return super().forward(x) * 1.05


def test_a_wrong_kernel_is_never_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("TP_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.setitem(woq.KERNELS, "off_int8", _Off)
    monkeypatch.setattr(woq.select, "_chosen", {})
    monkeypatch.setattr(woq.select, "_probed", {})
    qw = quant_weight(SCHEMES["int8"], 64, 128, 3)
    assert "off_int8" in woq.candidates(qw, torch.float32, auto=True)
    assert woq.probe("off_int8", qw, torch.float32) == pytest.approx(0.05, rel=1e-3)
    assert woq.probe("dequant_int8", qw, torch.float32) < 1e-5
    # timing would pick it (it is made the fastest); the probe drops it first, with a warning naming it
    monkeypatch.setattr(woq.select, "time_kernel", lambda k, x: 0.0 if isinstance(k, _Off) else 1.0)
    with pytest.warns(RuntimeWarning, match=r"woq kernel off_int8 dropped: 0\.05 off .* on .*\["):
        assert woq.choose(qw, torch.float32) != "off_int8"
    # a disk cache that names it (written on another CPU, or before a bug was found) is not trusted either
    key = woq.cache_key(qw, torch.float32)
    with open(woq.cache_path(), "w") as f:
        json.dump({key: "off_int8"}, f)
    monkeypatch.setattr(woq.select, "_chosen", {})
    with pytest.warns(RuntimeWarning, match="off_int8 dropped"):
        assert woq.choose(qw, torch.float32) != "off_int8"
    # named, it is a clear error, not a wrong answer
    qw.kernel = "off_int8"
    with pytest.raises(UserError, match=r"--woq_kernel off_int8 is 0\.05 off the dequantized matmul .* use auto"):
        woq.choose(qw, torch.float32)


def test_cache_key_names_the_flags_that_decide_the_kernel_path(monkeypatch):
    qw = quant_weight(SCHEMES["int4_g32"], 64, 128, 3)
    monkeypatch.delenv("TP_RUNTIME_ISA", raising=False)
    assert cpu.tag() in woq.cache_key(qw, torch.float32)
    monkeypatch.setenv("TP_RUNTIME_ISA", "avx2")
    assert "capped: avx2" in woq.cache_key(qw, torch.float32)
    assert not cpu.native_half("bfloat16") and cpu.q8_dot() == 0
    assert not any(f.startswith(("avx512", "amx", "avx_vnni")) for f in cpu.flags())


def test_auto_choice_is_timed_once_and_cached(tmp_path, monkeypatch):
    """Each layer shape is timed once per machine: the first load times every candidate, a second one in this
    process uses the in-process choice, and a new process (simulated: the in-process choice cleared) reads the
    disk cache instead of timing again."""
    monkeypatch.setenv("TP_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.setattr(woq.select, "_chosen", {})
    timed = []
    real = woq.select.time_kernel
    monkeypatch.setattr(woq.select, "time_kernel", lambda k, x: timed.append(k.name) or real(k, x, calls=3))
    qw = quant_weight(SCHEMES["int8"], 64, 128, 0)
    auto = woq.candidates(qw, torch.float32, auto=True)
    assert len(auto) >= 2, auto  # (dequant_int8 and torch's aten_int8 at least: there is a choice to time)
    name = woq.choose(qw, torch.float32)
    assert name in auto and sorted(timed) == sorted(auto)  # every candidate timed, once
    with open(woq.cache_path()) as f:
        assert json.load(f)[woq.cache_key(qw, torch.float32)] == name
    assert woq.choose(qw, torch.float32) == name and len(timed) == len(auto)  # same process: no timing
    monkeypatch.setattr(woq.select, "_chosen", {})
    assert woq.choose(qw, torch.float32) == name and len(timed) == len(auto)  # "new process": the disk cache
    qw2 = quant_weight(SCHEMES["int8"], 64, 256, 0)  # another shape is timed on its own
    woq.choose(qw2, torch.float32)
    assert len(timed) == 2 * len(auto)
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
    for p, o in zip(prompts, out["outputs"], strict=True):
        assert o["input_ids"] == p and len(o["output_ids"]) == 6
        ref = reference_logprobs(model, p, o["output_ids"])
        gaps.append(max(abs(a - b) for a, b in zip(ref, o["output_logprobs"], strict=True)))
    return max(gaps)


def run_engine(engine, tp, prompts, extra=()):
    return tp_run_json(engine, tp, ["--input_ids", *(",".join(map(str, p)) for p in prompts),
                                    "--max_output_len", "6", "--ignore_eos", *extra],
                       env_extra={"TP_RUNTIME_CACHE": os.environ["TP_RUNTIME_CACHE"]})


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_int8_engine_logprobs_close_to_fp32(ckpt, tp, tmp_path):
    root, model = ckpt
    engine = str(tmp_path / "e")
    convert(str(root / "hf"), engine, tp, progress=False, quant=qz.parse_scheme("int8", quantize_lm_head=tp == 2))
    prompts = random_prompts(103, seed=tp)
    # tp=1: torch's int8 kernel as this CPU serves it (fed bf16 where bf16 is native); tp=2: auto's choice
    named = ("aten_int8_bf16" if cpu.native_half("bfloat16") else "aten_int8") if tp == 1 else "auto"
    out = run_engine(engine, tp, prompts, ["--woq_kernel", named])
    assert logprob_gap(model, out, prompts) <= 0.05
    out = run_engine(engine, tp, prompts, ["--woq_kernel", "fbgemm_int8"])
    assert logprob_gap(model, out, prompts) <= 0.05


@pytest.mark.slow
def test_untraceable_kernel_keeps_the_eager_step(ckpt, tmp_path, monkeypatch):
    """FBGEMM's prepacked weight cannot enter a torch.compile graph: auto falls back to the eager step,
    --compile on says why."""
    from tp_runtime import LLM

    root, _ = ckpt
    engine = str(tmp_path / "e")
    convert(str(root / "hf"), engine, 1, progress=False, quant=qz.parse_scheme("int8"))
    monkeypatch.delenv("TP_RUNTIME_COMPILE", raising=False)
    llm = LLM(engine, woq_kernel="fbgemm_int8")
    assert llm.compiled is False
    # which kernel each linear runs: 2 layers x (qkv, dense, fc+gate, proj), all the named one
    kernels = llm.woq_kernels()
    assert len(kernels) == 8 and set(kernels.values()) == {"fbgemm_int8"}
    assert llm.kernel_summary().startswith("fbgemm_int8 x8 (")
    llm.close()
    with pytest.raises(UserError, match="cannot trace the fbgemm_int8 kernel"):
        LLM(engine, woq_kernel="fbgemm_int8", compile="on")


@pytest.mark.slow
def test_int4_g32_engine_runs_at_tp2(ckpt, tmp_path):
    root, model = ckpt
    engine = str(tmp_path / "e")
    convert(str(root / "hf"), engine, 2, progress=False,
            quant=qz.parse_scheme("int4", 32, zero_point=True, quantize_lm_head="int4"))
    raw = ef.EngineConfig.load(engine).quantization
    assert raw["quant_algo"] == "W4A16" and raw["group_size"] == 32 and raw["has_zero_point"]
    assert raw["lm_head_precision"] == "int4" and "lm_head" not in raw["exclude_modules"]
    header, _ = ef.read_safetensors_header(os.path.join(engine, ef.rank_file(1)))
    assert header[f"lm_head.{ef.INT4_SCALE}"]["shape"][1] == model.config.hidden_size // 32  # int4 head, g32
    prompts = random_prompts(103, seed=5)
    out = run_engine(engine, 2, prompts)
    # 4 bits on a random model: close to the float model's probabilities, though not within int8's margin
    assert logprob_gap(model, out, prompts) <= 0.5
    ref = run_engine(engine, 2, prompts, ["--woq_kernel", "dequant_int4"])  # the fallback agrees
    for a, b in zip(out["outputs"], ref["outputs"], strict=True):
        assert max(abs(x - y) for x, y in zip(a["output_logprobs"], b["output_logprobs"], strict=True)) < 0.02


def test_plan_is_exact_for_quantized_engines(tmp_path):
    from test_plan import data_bytes, family_config
    from tp_runtime.convert.synthetic import write_synthetic

    cfg = dict(family_config("llama"), intermediate_size=128)
    write_synthetic(cfg, str(tmp_path / "hf"), dtype="float32", progress=False)
    for precision, group in (("int8", None), ("int4", 32)):
        engine = str(tmp_path / precision)
        convert(str(tmp_path / "hf"), engine, 2, progress=False, max_seq_len=64,
                quant=qz.parse_scheme(precision, group))
        report = plan(cfg, 2, "float32", precision=precision, group_size=group, max_seq_len=64)
        for r in report["ranks"]:
            assert r["weight_bytes"] == data_bytes(os.path.join(engine, f"rank{r['rank']}.safetensors"))


@pytest.mark.slow
def test_bad_quantization_input(ckpt, tmp_path, capsys):
    from tp_runtime.cli import convert as convert_main

    root, _ = ckpt
    hf = str(root / "hf")
    with pytest.raises(UserError, match="--quantize_lm_head takes int8 or int4"):
        qz.parse_scheme("int4", 32, quantize_lm_head="int2")

    def convert_cli(*flags, code=2):  # tp-convert's main in this process (the console script: below)
        rc, err = cli_in_process(convert_main.main, ["--model_dir", hf, "--output_dir", str(tmp_path / "x"),
                                                     "--no_progress", *flags], capsys)
        assert rc == code, (rc, err)
        return err

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
    res = run_ranks(1, [tool("tp-convert"), "--model_dir", str(tmp_path / "odd"), "--output_dir",  # the script
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


# ---------------------------------------------------------------------------
# AWQ


def test_awq_search_lowers_the_reconstruction_error_of_its_calibration_rows():
    from tp_runtime.convert import awq
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(400, 128, generator=g)
    x[:, [3, 50, 77]] *= 25  # the outlier input channels real activations have
    scheme = qz.QuantScheme("int4", 32)
    s, alpha, err_rtn, err_awq = awq.search_scale(w, x.abs().mean(0), x, scheme)
    assert alpha > 0 and s.shape == (128,) and (s > 0).all()
    # recomputed here, from the scheme's own functions: RTN of w, and RTN of w * s with x / s
    y = x @ w.t()
    rtn = ((y - x @ qz.dequantize(qz.quantize_rtn(w, scheme)).t()) ** 2).sum() / x.shape[0]
    aw = ((y - (x / s) @ qz.dequantize(qz.quantize_rtn(w * s, scheme)).t()) ** 2).sum() / x.shape[0]
    assert abs(rtn.item() - err_rtn) < 1e-3 * err_rtn and abs(aw.item() - err_awq) < 1e-3 * err_awq
    assert aw < 0.7 * rtn, (aw, rtn)


@pytest.fixture(scope="module")
def awq_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    return root, build_outlier_checkpoint(str(root / "hf"))


@pytest.mark.slow
def test_awq_engine_is_closer_to_the_float_model_than_rtn(awq_ckpt, tmp_path):
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    root, model = awq_ckpt
    tok = AutoTokenizer.from_pretrained(str(root / "hf"))
    ids = tok(topics["if"])["input_ids"]
    prompts = [ids[i * 40:(i + 1) * 40] for i in range(4)]
    gaps = {}
    for algo in ("rtn", "awq"):
        engine = str(tmp_path / algo)
        cfg = convert(str(root / "hf"), engine, 2, progress=False, calib_samples=8, calib_seq_len=64,
                      quant=qz.parse_scheme("int4", 32, zero_point=True, algo=algo))
        assert cfg.quantization["quant_algo"] == ("W4A16_AWQ" if algo == "awq" else "W4A16")
        out = run_engine(engine, 2, prompts, ["--max_output_len", "8"])
        diffs = [abs(a - b) for p, o in zip(prompts, out["outputs"], strict=True)
                 for a, b in zip(reference_logprobs(model, p, o["output_ids"]), o["output_logprobs"], strict=True)]
        gaps[algo] = sum(diffs) / len(diffs)
    assert gaps["awq"] < 0.8 * gaps["rtn"], gaps
    # qkv's and fc/gate's scales went into the norms (no prequant factor for them); with GQA (4 heads,
    # 2 KV heads) dense's could only be a prequant factor
    from safetensors.torch import load_file

    awq_r1, rtn_r1 = (load_file(os.path.join(str(tmp_path / a), "rank1.safetensors")) for a in ("awq", "rtn"))
    norm = "transformer.layers.0.input_layernorm.weight"
    assert not torch.equal(awq_r1[norm], rtn_r1[norm])
    assert not any(n.endswith(("qkv.prequant_scaling_factor", "fc.prequant_scaling_factor")) for n in awq_r1)
    assert all(n.endswith("dense.prequant_scaling_factor") for n in awq_r1 if n.endswith("prequant_scaling_factor"))


@pytest.mark.parametrize("group, zero_point", [(32, False), (-1, True)])
def test_clip_search_errors_are_the_clipped_weights_output_errors(group, zero_point):
    """search_clip's reported errors, recomputed from the clamp it returns and quantize_rtn; the clip
    lowers the output error; the ranges are the full ranges shrunk by a grid ratio in [0.55, 1]."""
    from tp_runtime.convert import awq
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 128, generator=g) * 0.05
    w[torch.rand(w.shape, generator=g) < 0.01] *= 8  # a few large weights per row: worth clipping
    x = torch.randn(300, 128, generator=g)
    x[:, [9, 70]] *= 10
    scheme = qz.QuantScheme("int4", group, zero_point)
    lo, hi, before, after = awq.search_clip(w, x, scheme)
    gs = 128 if group == -1 else group
    wg = w.view(40, -1, gs)  # (out, groups, group)
    # the range the quantizer keeps: [min, max] holding 0 with zero points; Q4_0's 15/8 of the largest |w|
    full = wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0) if zero_point else wg.abs().amax(-1) * 15 / 8
    ratio = (hi - lo) / full
    assert ((ratio > 0.549) & (ratio < 1.0 + 1e-6)).all() and (ratio < 1).any()
    assert torch.allclose((ratio * 20).round(), ratio * 20, atol=1e-3)  # on the 0.05 grid
    clipped = torch.clamp(wg, lo.unsqueeze(-1), hi.unsqueeze(-1)).view(40, 128)

    def out_err(v):
        return ((x @ (qz.dequantize(qz.quantize_rtn(v, scheme)) - w).t()) ** 2).sum().item() / x.shape[0]

    assert abs(out_err(w) - before) < 1e-3 * before and abs(out_err(clipped) - after) < 1e-3 * after
    assert after < 0.9 * before, (after, before)


@pytest.mark.slow
@pytest.mark.parametrize("zero_point", [False, True])
def test_awq_clip_lowers_the_output_error_on_the_calibration_activations(awq_ckpt, zero_point):
    """The AWQ search with clipping against the same search without, on the same calibration activations
    of a tiny model: same scales; q and k never clipped; every other quantized linear's output error on
    its calibration rows (recomputed here from transform() and quantize_rtn) lower in sum."""
    from tp_runtime.convert import awq
    from tp_runtime.convert.checkpoint import open_checkpoint

    root, _ = awq_ckpt
    hf = str(root / "hf")
    adapter = get_adapter(open_checkpoint(hf))
    fields = adapter.config()
    tensors = {ct.name: ct for ct in adapter.tensors(fields)}
    acts = awq.collect_activations(hf, None, 8, 64)
    scheme = qz.QuantScheme("int4", 32, zero_point, "awq")
    runs = {clip: awq.search(hf, tensors, fields, scheme, None, 8, 64, clip=clip, acts=acts) for clip in (False, True)}
    assert runs[False].alphas == runs[True].alphas and not runs[False].clip
    errs = {False: 0.0, True: 0.0}  # summed over the layers' weights
    for i in range(fields["num_hidden_layers"]):
        p = ef.layer_prefix(i)
        for key, names in (("qkv", ["attention.qkv"]), ("dense", ["attention.dense"]),
                           ("fc_gate", ["mlp.fc", "mlp.gate"]), ("proj", ["mlp.proj"])):
            rows = acts[(i, key)][1]
            for n in names:
                name = f"{p}.{n}.weight"
                s = runs[False].col_scale.get(name, torch.ones(rows.shape[1]))
                x = rows / s  # the linear's input once AWQ's scale is folded in
                ref = awq.transform(name, tensors[name].load(False), runs[False])  # scaled, not clipped
                one = {}
                for clip in (False, True):
                    t = awq.transform(name, tensors[name].load(False), runs[clip])
                    parts, refs = (t, ref) if key == "qkv" else ((t,), (ref,))
                    one[clip] = 0.0
                    for j, (w, r) in enumerate(zip(parts, refs, strict=True)):
                        if key == "qkv" and j < 2:  # q and k: never clipped
                            assert torch.equal(w, r)
                            continue
                        deq = qz.dequantize(qz.quantize_rtn(w, scheme))
                        one[clip] += ((x @ (deq - r).t()) ** 2).sum().item() / x.shape[0]
                    errs[clip] += one[clip]
                assert one[True] <= one[False] * (1 + 1e-5), (name, one)  # never worse, weight by weight
    assert errs[True] < 0.9 * errs[False], errs


def test_awq_calibration_holds_one_layer_at_a_time(tmp_path):
    """Calibration and search run layer by layer on the reference forward: once a tensor of layer i is
    loaded, no tensor loaded for an earlier layer is still alive nor loaded again; at no load are more
    tensors alive than one layer has; each is loaded a fixed number of times (forward, scale search,
    clip search), whatever the depth."""
    import weakref

    from tp_runtime.convert import awq
    from tp_runtime.convert.checkpoint import open_checkpoint

    hf = str(tmp_path / "hf")
    build_checkpoint(hf, "llama", num_hidden_layers=4, intermediate_size=128)
    save_char_tokenizer(hf)
    adapter = get_adapter(open_checkpoint(hf))
    fields = adapter.config()
    tensors = {ct.name: ct for ct in adapter.tensors(fields)}
    alive, loads, wrong = [], [], []  # alive: (layer, weakref) of every tensor handed out

    def layer_of(name):
        return int(name.split(".")[2]) if name.startswith("transformer.layers.") else -1

    def watched(ct, load):
        def wrapped(meta):
            out = load(meta)
            if meta:
                return out
            i = layer_of(ct.name)
            if any(j < i and r() is not None for j, r in alive):
                wrong.append(f"{ct.name} loaded while an earlier layer's tensor is alive")
            if loads and i < max(layer_of(n) for n in loads):
                wrong.append(f"{ct.name} loaded again after a later layer")
            loads.append(ct.name)
            alive.extend((i, weakref.ref(t)) for t in (out if isinstance(out, tuple) else (out,)))
            peak.append(sum(r() is not None for _, r in alive))
            return out
        return wrapped

    peak = []
    for ct in tensors.values():
        ct.load = watched(ct, ct.load)
    res = awq.search(hf, tensors, fields, qz.QuantScheme("int4", 32, False, "awq"), None, 4, 32)
    assert not wrong, wrong[:3]
    assert sorted({layer_of(n) for n in loads}) == [-1, 0, 1, 2, 3] and len(res.alphas) == 16
    per_layer = sum(3 if n.endswith("qkv.weight") else 1 for n in tensors if layer_of(n) == 0)
    assert max(peak) <= per_layer, (max(peak), per_layer)
    counts = {n: loads.count(n) for n in set(loads)}
    for i in range(4):
        p = ef.layer_prefix(i)
        assert counts[f"{p}.mlp.proj.weight"] == 3 and counts[f"{p}.input_layernorm.weight"] == 1
    assert all(r() is None for _, r in alive)


@pytest.mark.slow
def test_awq_bad_calibration_input(awq_ckpt, tmp_path, capsys):
    from tp_runtime.cli import convert as convert_main

    root, _ = awq_ckpt
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    short.write_text("too short")

    def convert_cli(*flags):  # tp-convert's main in this process: one line, status 2
        rc, err = cli_in_process(convert_main.main, ["--model_dir", str(root / "hf"), "--output_dir",
                                                     str(tmp_path / "x"), "--no_progress", *flags], capsys)
        assert rc == 2, (rc, err)
        return err

    awq_flags = ["--use_weight_only", "--weight_only_precision", "int4", "--group_size", "32", "--quant_algo", "awq"]
    assert "is empty" in convert_cli(*awq_flags, "--calib_file", str(empty))
    err = convert_cli(*awq_flags, "--calib_file", str(short), "--calib_seq_len", "64")
    assert "has 9 tokens, shorter than one sample of --calib_seq_len 64" in err
    assert "does not exist" in convert_cli(*awq_flags, "--calib_file", str(tmp_path / "nope.txt"))
    assert "are for --quant_algo awq" in convert_cli("--use_weight_only", "--calib_samples", "4")
    assert "--no_awq_clip are for --quant_algo awq" in convert_cli("--use_weight_only", "--no_awq_clip")
    assert "int4" in convert_cli("--use_weight_only", "--quant_algo", "awq")
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------
# pre-quantized checkpoints, packed here from the formats' descriptions (see prequantized.py)


def _int32(t):
    """Unsigned 32-bit patterns (in int64) as int32, as the formats store them."""
    t = t & 0xFFFFFFFF
    return (t - (t >= 2**31).long() * 2**32).to(torch.int32)


def _quantize_asym(w, group, min_zero):
    """(out, in) -> codes (out, in), zeros (out, groups), fp16 scales (out, groups)."""
    out_f, in_f = w.shape
    wg = w.view(out_f, in_f // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).half()
    zero = torch.round(-lo / scale.float()).clamp(min_zero, 15)
    codes = (torch.round(wg / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15)
    return codes.view(out_f, in_f).long(), zero.long(), scale


def _pack_awq(codes_t):
    """(rows, cols) -> (rows, cols / 8): nibble i of int32 c holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    rows, cols = codes_t.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.long)
    for i, o in enumerate(order):
        packed |= codes_t[:, o::8] << (4 * i)
    return _int32(packed)


def _gptq_tensors(codes, zero, scale, group):
    in_f = codes.shape[1]
    ct = codes.t()  # (in, out)
    qweight = torch.zeros(in_f // 8, ct.shape[1], dtype=torch.long)
    for j in range(8):
        qweight |= ct[j::8] << (4 * j)  # nibble j of row r: input 8r + j
    zt = (zero.t() - 1) & 0xF  # (groups, out), stored as zero - 1
    qzeros = torch.zeros(zt.shape[0], zt.shape[1] // 8, dtype=torch.long)
    for j in range(8):
        qzeros |= zt[:, j::8] << (4 * j)
    return {"qweight": _int32(qweight), "qzeros": _int32(qzeros), "scales": scale.t().contiguous(),
            "g_idx": (torch.arange(in_f) // group).to(torch.int32)}


def write_prequantized(hf, method, group, desc_act=False, scatter=False):
    """A tiny Llama checkpoint in AutoAWQ-GEMM or GPTQ form at `hf`; returns the transformers model holding
    exactly the weights its codes stand for. scatter: an act-order g_idx (a permutation's groups)."""
    import json

    from safetensors.torch import load_file, save_file

    model = build_checkpoint(hf, "llama", intermediate_size=128)
    sd = load_file(os.path.join(hf, "model.safetensors"))
    linears = [n for n in sd if n.endswith(("_proj.weight",))]
    for name in linears:
        prefix = name[: -len(".weight")]
        codes, zero, scale = _quantize_asym(sd.pop(name).float(), group, 0 if method == "awq" else 1)
        deq = ((codes.view(codes.shape[0], -1, group) - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1))
        with torch.no_grad():  # the reference model holds exactly the weights the codes stand for
            model.get_submodule(prefix).weight.copy_(deq.view(codes.shape))
        if method == "awq":
            parts = {"qweight": _pack_awq(codes.t()), "qzeros": _pack_awq(zero.t()), "scales": scale.t().contiguous()}
        else:
            parts = _gptq_tensors(codes, zero, scale, group)
            if scatter:  # AutoGPTQ without static_groups: g_idx[i] = (position of input i in the order) // group
                order = torch.randperm(codes.shape[1], generator=torch.Generator().manual_seed(1))
                parts["g_idx"] = (torch.argsort(order) // group).to(torch.int32)
        sd.update({f"{prefix}.{k}": v for k, v in parts.items()})
    save_file(sd, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(hf, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                   "version": "gemm"} if method == "awq" else
                                  {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act,
                                   "sym": False})
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_prequantized_checkpoint_shards_and_matches_its_dequantized_weights(method, tmp_path):
    from safetensors.torch import load_file

    group = 32
    model = write_prequantized(str(tmp_path / "hf"), method, group)

    engine = str(tmp_path / "e")
    ec = convert(str(tmp_path / "hf"), engine, 2, progress=False)
    assert ec.quantization["quant_algo"] == ("W4A16_AWQ" if method == "awq" else "W4A16_GPTQ")
    assert ec.quantization["group_size"] == group and ec.quantization["has_zero_point"]
    # rank 1's down_proj slice (row-parallel) and q/k/v (its heads) are the dequantized weights' slices
    r1 = load_file(os.path.join(engine, "rank1.safetensors"))
    proj = qz.dequantize(qz.from_engine_tensors("transformer.layers.1.mlp.proj.weight", r1, "int4"))
    assert torch.equal(proj, model.model.layers[1].mlp.down_proj.weight[:, 64:].float())
    qkv = qz.dequantize(qz.from_engine_tensors("transformer.layers.0.attention.qkv.weight", r1, "int4"))
    attn = model.model.layers[0].self_attn
    D = 16
    expect = torch.cat([attn.q_proj.weight[2 * D:], attn.k_proj.weight[D:], attn.v_proj.weight[D:]])
    assert torch.equal(qkv, expect.float())
    prompts = random_prompts(103, seed=9)
    out = run_engine(engine, 2, prompts, ["--woq_kernel", "dequant_int4"])
    assert logprob_gap(model, out, prompts) < 1e-3
    with pytest.raises(UserError, match="already quantized"):
        convert(str(tmp_path / "hf"), str(tmp_path / "e2"), 1, progress=False, quant=qz.parse_scheme("int8"))


def test_gptq_act_order(tmp_path):
    """desc_act with static groups (g_idx = input // group) is read like any other; a scattered g_idx is
    refused at conversion with the reason, and no engine is left behind."""
    from safetensors.torch import load_file

    model = write_prequantized(str(tmp_path / "static"), "gptq", 32, desc_act=True)
    convert(str(tmp_path / "static"), str(tmp_path / "e"), 1, progress=False)
    r0 = load_file(str(tmp_path / "e" / "rank0.safetensors"))
    proj = qz.dequantize(qz.from_engine_tensors("transformer.layers.1.mlp.proj.weight", r0, "int4"))
    assert torch.equal(proj, model.model.layers[1].mlp.down_proj.weight.float())
    write_prequantized(str(tmp_path / "scattered"), "gptq", 32, desc_act=True, scatter=True)
    with pytest.raises(UserError, match=r"layers\.0\.self_attn\.q_proj: act-order GPTQ \(desc_act\) with a g_idx "
                                        r"that is not input // 32.*static_groups=True"):
        convert(str(tmp_path / "scattered"), str(tmp_path / "e2"), 1, progress=False)
    assert not os.path.exists(tmp_path / "e2")
