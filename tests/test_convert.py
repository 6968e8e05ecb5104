"""The converter: engine layout and config, rank files that hold exactly each rank's slices,
sharded checkpoints with an index, the streaming writer."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import build_checkpoint
from tp_runtime.engine import format as ef
from tp_runtime.convert.pipeline import convert
from tp_runtime.convert.writer import StreamingSafetensorsWriter


def rank_tensors(engine, r):
    return load_file(os.path.join(engine, f"rank{r}.safetensors"))


def test_streaming_writer_is_read_by_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "empty": torch.zeros(0, 3)}
    w = StreamingSafetensorsWriter(str(tmp_path / "x.safetensors"), [(k, v.dtype, v.shape) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_engine_layout_config_and_slices(tmp_path):
    model = build_checkpoint(str(tmp_path / "hf"), "qwen2", num_attention_heads=6, num_key_value_heads=3,
                             hidden_size=48, intermediate_size=70, vocab_size=101)
    cfg = convert(str(tmp_path / "hf"), str(tmp_path / "e"), 2, progress=False)
    engine = str(tmp_path / "e")
    raw = json.load(open(os.path.join(engine, "config.json")))
    assert raw["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert raw["quantization"]["quant_algo"] is None and raw["format_version"] == ef.FORMAT_VERSION
    assert (raw["heads_per_rank"], raw["kv_heads_per_rank"]) == ([4, 2], [2, 1])  # 3 KV groups on 2 ranks: 2 + 1
    assert raw["intermediate_size_per_rank"] == [35, 35] and raw["vocab_size_padded"] == 102
    assert cfg.qkv_bias and raw["source_architecture"] == "Qwen2ForCausalLM"
    sd = {k: v.float() for k, v in model.state_dict().items()}
    D = 8
    r0, r1 = rank_tensors(engine, 0), rank_tensors(engine, 1)
    q, k, v = (sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(r0["transformer.layers.0.attention.qkv.weight"], torch.cat([q[:4 * D], k[:2 * D], v[:2 * D]]))
    assert torch.equal(r1["transformer.layers.0.attention.qkv.weight"], torch.cat([q[4 * D:], k[2 * D:], v[2 * D:]]))
    qb = sd["model.layers.0.self_attn.q_proj.bias"]
    assert torch.equal(r1["transformer.layers.0.attention.qkv.bias"][:2 * D], qb[4 * D:])
    o = sd["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(r1["transformer.layers.0.attention.dense.weight"], o[:, 4 * D:])
    assert torch.equal(r0["transformer.layers.1.mlp.fc.weight"], sd["model.layers.1.mlp.gate_proj.weight"][:35])
    assert torch.equal(r1["transformer.layers.1.mlp.gate.weight"], sd["model.layers.1.mlp.up_proj.weight"][35:])
    assert torch.equal(r1["transformer.layers.1.mlp.proj.weight"], sd["model.layers.1.mlp.down_proj.weight"][:, 35:])
    head = sd["lm_head.weight"]
    assert torch.equal(r1["lm_head.weight"][:50], head[51:]) and not r1["lm_head.weight"][50].any()
    assert torch.equal(r0["transformer.vocab_embedding.weight"], sd["model.embed_tokens.weight"])
    # each rank file holds exactly its own tensors
    assert set(r0) == set(r1)
    assert os.path.isfile(os.path.join(engine, "generation_config.json"))
    mode = os.stat(engine).st_mode & 0o777
    assert mode & 0o055, oct(mode)  # not a private temp dir


def test_tied_embeddings_store_the_head_only_when_its_sharding_differs(tmp_path):
    build_checkpoint(str(tmp_path / "hf"), "llama", tie_word_embeddings=True)
    convert(str(tmp_path / "hf"), str(tmp_path / "tp1"), 1, progress=False)
    convert(str(tmp_path / "hf"), str(tmp_path / "tp2"), 2, progress=False)
    assert "lm_head.weight" not in rank_tensors(str(tmp_path / "tp1"), 0)
    r1 = rank_tensors(str(tmp_path / "tp2"), 1)
    emb = r1["transformer.vocab_embedding.weight"]
    assert r1["lm_head.weight"].shape == (52, 64) and torch.equal(r1["lm_head.weight"][:51], emb[52:])


def test_sharded_checkpoint_with_index_and_dtype_flag(tmp_path):
    build_checkpoint(str(tmp_path / "hf"), "llama")
    single = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "generation_config.json"):
        (sharded / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    names = sorted(single)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: single[k] for k in keys}, str(sharded / fname))
        weight_map.update({k: fname for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert(str(tmp_path / "hf"), str(tmp_path / "a"), 2, progress=False)
    cfg = convert(str(sharded), str(tmp_path / "b"), 2, dtype="bfloat16", progress=False)
    assert cfg.dtype == "bfloat16"
    for r in range(2):
        a, b = rank_tensors(str(tmp_path / "a"), r), rank_tensors(str(tmp_path / "b"), r)
        assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)


def test_force_replaces_an_engine(tmp_path):
    build_checkpoint(str(tmp_path / "hf"), "llama")
    convert(str(tmp_path / "hf"), str(tmp_path / "e"), 2, progress=False)
    convert(str(tmp_path / "hf"), str(tmp_path / "e"), 1, force=True, progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "e") if f.startswith("rank")) == ["rank0.safetensors"]
    assert ef.EngineConfig.load(str(tmp_path / "e")).tp_size == 1
