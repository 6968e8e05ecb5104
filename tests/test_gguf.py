"""GGUF files converted with their Q8_0 / Q4_0 / Q4_1 blocks kept: the engine's codes are the file's codes, and
its logits are those of a float model built from gguf's own dequantization of the same blocks, at tp 1 and 2.

The GGUF is written here with gguf's GGUFWriter from a tiny random Llama, each linear quantized with gguf's
quants module and its q / k rows put in llama.cpp's RoPE order (as convert_hf_to_gguf.py does). The reference
model is transformers' LlamaForCausalLM holding gguf.quants.dequantize(gguf.quants.quantize(W)) in Hugging
Face's own row order, so it shares no code with the import (names, row order, block decoding)."""

import os

import numpy as np
import pytest
import torch

from helpers import assert_engine_matches, build_checkpoint, cli_in_process, random_prompts
from tp_runtime.convert import quantize as qz
from tp_runtime.convert.pipeline import convert
from tp_runtime.engine import format as ef
from tp_runtime.runtime import woq

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# Per layer, the block type of each linear: fused sets (q, k, v; gate, up) share a precision, and layer 1
# mixes Q4_0 with Q4_1 inside q, k, v; o_proj and the MLP mix int8 and int4 across the model (MIXED_PRECISION).
TYPES = [
    {"q_proj": Q.Q4_1, "k_proj": Q.Q4_1, "v_proj": Q.Q4_1, "o_proj": Q.Q8_0,
     "gate_proj": Q.Q4_0, "up_proj": Q.Q4_0, "down_proj": Q.Q4_1},
    {"q_proj": Q.Q4_0, "k_proj": Q.Q4_1, "v_proj": Q.Q4_0, "o_proj": Q.Q4_0,
     "gate_proj": Q.Q8_0, "up_proj": Q.Q8_0, "down_proj": Q.Q8_0},
]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
TINY = dict(vocab_size=103, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# SmolLM2-135M's widths (9 heads, 3 KV heads: 6 + 3 and 2 + 1 at tp 2), one layer, a small vocabulary
SMOL = dict(vocab_size=211, hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
            num_key_value_heads=3)


def llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute: per head, the rotary halves interleaved (rows (2, dim / 2) -> (dim / 2, 2))."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def round_trip(w: torch.Tensor, kind) -> torch.Tensor:
    """gguf's own quantize then dequantize: the float weight the blocks stand for."""
    blocks = gguf.quants.quantize(w.numpy().astype(np.float32), kind)
    return torch.from_numpy(gguf.quants.dequantize(blocks, kind).astype(np.float32))


def write_gguf(path: str, model, types=TYPES, linear_override=None) -> dict:
    """model (transformers Llama) as a GGUF at `path`; returns the reference state dict (dequantized blocks)."""
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    tokens = ["<pad>", "<s>", "</s>", "t", "0", "t0"] + [f"x{i}" for i in range(cfg.vocab_size - 6)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
    w.add_token_merges(["t 0"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    ref = dict(sd)

    def put(gguf_name, hf_name, kind, heads=None):
        t = sd[hf_name].numpy()
        if heads is not None:
            t = llama_cpp_rows(t, heads)
        if kind == Q.F32:
            w.add_tensor(gguf_name, t.astype(np.float32))
            return
        if kind == Q.F16:
            w.add_tensor(gguf_name, t.astype(np.float16))
            ref[hf_name] = torch.from_numpy(t.astype(np.float16).astype(np.float32))
            return
        w.add_tensor(gguf_name, gguf.quants.quantize(t.astype(np.float32), kind), raw_dtype=kind)
        ref[hf_name] = round_trip(sd[hf_name], kind)  # blocks are along the inputs: the row order does not matter

    put("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0)
    for i, layer_types in enumerate(types):
        put(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", Q.F32)
        put(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", Q.F32)
        for hf, kind in layer_types.items():
            kind = (linear_override or {}).get((i, hf), kind)
            part = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(hf)
            put(f"blk.{i}.{GGUF_NAMES[hf]}.weight", f"model.layers.{i}.{part}.{hf}.weight", kind, heads)
    put("output_norm.weight", "model.norm.weight", Q.F32)
    put("output.weight", "lm_head.weight", Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def reference_model(model, ref: dict):
    from transformers import LlamaForCausalLM

    out = LlamaForCausalLM(model.config).eval()
    out.load_state_dict(ref)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = build_checkpoint(str(root / "hf"), "llama", seed=3, **TINY)
    path = str(root / "tiny.gguf")
    ref = write_gguf(path, model, TYPES[: TINY["num_hidden_layers"]])
    return path, reference_model(model, ref), root


def block_codes(path: str, gguf_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, d, m) of a Q4_0 / Q4_1 / Q8_0 tensor, decoded here from the file's bytes (GGUF row order)."""
    t = next(x for x in gguf.GGUFReader(path).tensors if x.name == gguf_name)
    rows = np.asarray(t.data)
    kind = t.tensor_type
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[kind]
    b = rows.reshape(rows.shape[0], -1, size)  # (out, blocks, bytes)
    d = torch.from_numpy(b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == Q.Q8_0:
        return torch.from_numpy(b[..., 2:].copy().view(np.int8)).reshape(rows.shape[0], -1), d, None
    m = torch.from_numpy(b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)) if kind == Q.Q4_1 else None
    qs = b[..., size - 16:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # block element j, then j + 16
    return torch.from_numpy(codes.reshape(rows.shape[0], -1).astype(np.uint8)), d, m


def test_blocks_are_imported_as_they_are(tiny, tmp_path):
    path, _, _ = tiny
    engine = str(tmp_path / "e1")
    cfg = convert(path, engine, 1, progress=False, quant=qz.QuantScheme("int8", -1, from_source=True))
    assert cfg.quantization["quant_algo"] == "MIXED_PRECISION" and cfg.quantization["group_size"] == 32
    assert cfg.quantization["has_zero_point"] is True
    assert cfg.quantization["source_formats"] == {"Q4_0": 5, "Q4_1": 5, "Q8_0": 4}
    from safetensors.torch import load_file

    t = load_file(os.path.join(engine, ef.rank_file(0)))
    heads, kv, D = TINY["num_attention_heads"], TINY["num_key_value_heads"], 16
    # layer 0: q, k, v Q4_1 (q, k in llama.cpp's row order in the file), o Q8_0, gate / up Q4_0, down Q4_1
    codes = [block_codes(path, f"blk.0.attn_{p}.weight") for p in "qkv"]
    undo = [np.argsort(llama_cpp_rows(np.arange(h * D), h)) for h in (heads, kv)] + [np.arange(kv * D)]
    want_q = torch.cat([c[0][u] for c, u in zip(codes, undo, strict=True)])
    want_d = torch.cat([c[1][u] for c, u in zip(codes, undo, strict=True)])
    want_m = torch.cat([c[2][u] for c, u in zip(codes, undo, strict=True)])
    qkv = "transformer.layers.0.attention.qkv"
    assert torch.equal(ef.unpack_int4(t[f"{qkv}.weight"]), want_q)
    assert torch.equal(t[f"{qkv}.weights_scaling_factor"], want_d)
    assert torch.equal(t[f"{qkv}.minimum"], want_m) and f"{qkv}.zero" not in t
    q8, d8, _ = block_codes(path, "blk.0.attn_output.weight")
    dense = "transformer.layers.0.attention.dense"
    assert t[f"{dense}.weight"].dtype == torch.int8 and torch.equal(t[f"{dense}.weight"], q8)
    assert torch.equal(t[f"{dense}.weights_scaling_factor"], d8)
    q4, d4, _ = block_codes(path, "blk.0.ffn_gate.weight")
    fc = "transformer.layers.0.mlp.fc"
    assert torch.equal(ef.unpack_int4(t[f"{fc}.weight"]), q4) and torch.equal(t[f"{fc}.weights_scaling_factor"], d4)
    assert f"{fc}.zero" not in t and f"{fc}.minimum" not in t  # Q4_0: symmetric, zero 8
    # layer 1 mixes Q4_0 (v) into Q4_1 (k): its minimum is -8 d, so d * q - 8 d = d * (q - 8) exactly
    v, dv, _ = block_codes(path, "blk.1.attn_v.weight")
    qkv1 = "transformer.layers.1.attention.qkv"
    rows = slice((heads + kv) * D, (heads + 2 * kv) * D)
    assert torch.equal(ef.unpack_int4(t[f"{qkv1}.weight"])[rows], v)
    assert torch.equal(t[f"{qkv1}.minimum"][rows], -8 * dv)
    # the embedding and lm_head are float: gguf's dequantized Q8_0
    emb = torch.from_numpy(gguf.quants.dequantize(np.asarray(next(
        x for x in gguf.GGUFReader(path).tensors if x.name == "token_embd.weight").data), Q.Q8_0))
    assert torch.equal(t[ef.EMBEDDING], emb)


@pytest.mark.parametrize("tp", [1, 2])
def test_kept_blocks_give_the_dequantized_models_logits(tiny, tmp_path, tp):
    path, ref, _ = tiny
    engine = str(tmp_path / f"e{tp}")
    convert(path, engine, tp, progress=False, quant=qz.QuantScheme("int8", -1, from_source=True))
    # at tp 2 a rank's dense slice is 32 inputs, under native_int4's blocks of 64
    kernel = "native_int4" if tp == 1 else "dequant_int4"
    assert_kept_logits(ref, engine, tp, random_prompts(TINY["vocab_size"], seed=tp), kernel)


def assert_kept_logits(ref, engine: str, tp: int, prompts: list, kernel: str = "native_int4", new: int = 6):
    """Greedy ids and log-probs (to 1e-4) of the reference on every row. Kernels in fp32 only (the bf16-fed
    ones round the activations): int4 through `kernel`; int8 per group has only fp32 ones."""
    from helpers import reference_greedy, reference_logprobs, tp_run_json
    from tp_runtime import LLM, SamplingParams

    if tp == 1:
        llm = LLM(engine, compile="off", bind="none", woq_kernel=kernel)
        try:
            res = llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
        finally:
            llm.close()
        outs = [{"output_ids": r.output_ids, "output_logprobs": r.output_logprobs} for r in res]
    else:
        outs = tp_run_json(engine, tp, ["--input_ids", *(",".join(map(str, p)) for p in prompts), "--max_output_len",
                                        str(new), "--ignore_eos", "--woq_kernel", kernel])["outputs"]
    for row, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        assert o["output_ids"] == reference_greedy(ref, p, new), f"tp={tp} row {row}"
        diff = max(abs(a - b) for a, b in zip(reference_logprobs(ref, p, o["output_ids"]), o["output_logprobs"],
                                              strict=True))
        assert diff < 1e-4, f"tp={tp} row {row}: log-probs differ by {diff}"


def test_smollm2_shaped_at_tp2(tmp_path):
    """SmolLM2's widths split 6 + 3 heads and 2 + 1 KV heads: each rank's input slice of dense / proj in whole
    blocks of 32."""
    model = build_checkpoint(str(tmp_path / "hf"), "llama", seed=5, **SMOL)
    path = str(tmp_path / "smol.gguf")
    types = [{k: Q.Q4_1 for k in TYPES[0]}]
    ref = reference_model(model, write_gguf(path, model, types))
    engine = str(tmp_path / "e")
    cfg = convert(path, engine, 2, progress=False, quant=qz.QuantScheme("int8", -1, from_source=True))
    assert cfg.quantization["quant_algo"] == "W4A16" and cfg.quantization["source_formats"] == {"Q4_1": 7}
    assert cfg.heads_per_rank == [6, 3] and cfg.kv_heads_per_rank == [2, 1]
    assert_kept_logits(ref, engine, 2, random_prompts(SMOL["vocab_size"], seed=7, lengths=(5, 9)))


def test_float_and_requantized_conversions(tiny, tmp_path, capsys):
    """Without --use_weight_only the engine is float (the dequantized blocks); an explicit precision rounds
    again, with a warning; a linear whose type is not kept (F16 here) is rounded to its set's format."""
    path, ref, root = tiny
    from tp_runtime.cli import convert as convert_cli

    rc, err = cli_in_process(convert_cli.main, ["--model_dir", path, "--output_dir", str(tmp_path / "f"),
                                                "--no_progress"], capsys)
    assert rc == 0 and "warning" not in err
    from safetensors.torch import load_file

    t = load_file(os.path.join(tmp_path / "f", ef.rank_file(0)))
    want = ref.state_dict()["model.layers.0.mlp.down_proj.weight"]  # gguf's dequantized Q4_1
    assert torch.equal(t["transformer.layers.0.mlp.proj.weight"], want)
    rc, err = cli_in_process(convert_cli.main, ["--model_dir", path, "--output_dir", str(tmp_path / "g"),
                                                "--no_progress", "--use_weight_only", "--weight_only_precision",
                                                "int4", "--group_size", "64"], capsys)
    assert rc == 0 and err.count("\n") == 1 and "Q4_0, Q4_1, Q8_0 blocks" in err and "rounded again to int4" in err
    model = build_checkpoint(str(root / "hf_f16"), "llama", seed=3, **TINY)
    f16 = str(tmp_path / "f16.gguf")
    write_gguf(f16, model, TYPES, linear_override={(1, "down_proj"): Q.F16})
    rc, err = cli_in_process(convert_cli.main, ["--model_dir", f16, "--output_dir", str(tmp_path / "h"),
                                                "--no_progress", "--use_weight_only"], capsys)
    assert rc == 0 and "1 linears of type F16 are not kept as they are: dequantized and rounded to int8 g32" in err
    t = load_file(os.path.join(tmp_path / "h", ef.rank_file(0)))
    proj = "transformer.layers.1.mlp.proj"
    assert t[f"{proj}.weight"].dtype == torch.int8 and t[f"{proj}.weights_scaling_factor"].shape == (64, 4)


def grouped_weights():
    g = torch.Generator().manual_seed(11)
    out_f, in_f = 80, 192  # inputs: 6 blocks of 32
    s = torch.rand(out_f, in_f // 32, generator=g) * 0.02 + 1e-3
    q8 = woq.QuantWeight("int8", torch.randint(-128, 128, (out_f, in_f), generator=g, dtype=torch.int8), s, None)
    m = torch.randn(out_f, in_f // 32, generator=g) * 0.05
    q4 = woq.QuantWeight("int4", torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8), s, None,
                         minimum=m)
    return q8, q4


def test_grouped_int8_and_int4_minimum_kernels():
    """Every fp32 kernel that claims a Q8_0-form or Q4_1-form weight matches the dequantized matmul to fp32
    rounding (tp_runtime's native kernels under TP_RUNTIME_ISA=avx2 too: make test runs both); the
    kernels that cannot hold a float minimum or a per-group int8 scale do not claim them."""
    q8, q4 = grouped_weights()
    # the dequantized weight, computed here: w = q * d (+ m) per block of 32 inputs
    w8 = (q8.q.float().view(80, 6, 32) * q8.scale.unsqueeze(-1)).view(80, 192)
    w4 = (q4.q.float().view(80, 6, 32) * q4.scale.unsqueeze(-1) + q4.minimum.unsqueeze(-1)).view(80, 192)
    assert torch.equal(q8.dequantize(), w8) and torch.equal(q4.dequantize(), w4)
    names8 = woq.candidates(q8, torch.float32)
    names4 = woq.candidates(q4, torch.float32)
    assert "aten_int8" not in names8 and "fbgemm_int8" not in names8 and "dequant_int8" in names8
    assert not {"native_int4_q8", "native_int4_q8x2"} & set(names4) and "dequant_int4" in names4
    assert {"native_int8"} <= set(names8) and {"native_int4", "aten_int4_cpu"} <= set(names4)  # (AVX2 here)
    x = torch.randn(24, 192, generator=torch.Generator().manual_seed(2))  # different data per row
    for w, names, dense in ((q8, names8, w8), (q4, names4, w4)):
        for name in (n for n in names if not n.endswith("_bf16")):
            kernel = woq.KERNELS[name](w, torch.float32)
            for rows in (1, 3, 5, 24):  # decode passes of 1-4 rows, and a prefill beyond GEMM_ROWS
                want = x[:rows] @ dense.t()
                err = ((kernel(x[:rows]) - want).abs().max() / want.abs().max()).item()
                assert err < 1e-5, (name, rows, err)


def test_kept_blocks_reslice(tiny, tmp_path):
    """An engine of kept blocks converted at tp 1 re-sliced for 2 ranks (and back) holds what a conversion at
    that tp writes: int8 codes per group, int4 minima and scales cut with their 32-input groups."""
    import dataclasses

    from safetensors.torch import load_file

    from tp_runtime.runtime.reslice import Reslicer

    path, _, _ = tiny
    engines = {tp: str(tmp_path / f"e{tp}") for tp in (1, 2)}
    for tp, engine in engines.items():
        convert(path, engine, tp, progress=False, quant=qz.QuantScheme("int8", -1, from_source=True))
    for n, m in ((1, 2), (2, 1)):
        want = ef.EngineConfig.load(engines[m])
        rs = Reslicer(engines[n], ef.EngineConfig.load(engines[n]), m)
        assert dataclasses.asdict(rs.config) == dataclasses.asdict(want)
        for r in range(m):
            converted = load_file(os.path.join(engines[m], ef.rank_file(r)))
            tensors = rs.rank_tensors(r, torch.float32, torch.device("cpu"))
            assert sorted(tensors) == sorted(converted)
            for name, expected in converted.items():
                got = tensors.assemble(name)
                assert got.dtype == expected.dtype and torch.equal(got, expected), f"{n} -> {m} rank {r} {name}"
            tensors.close()
