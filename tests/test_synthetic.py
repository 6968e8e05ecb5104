"""Synthetic checkpoints behave like a model: full-depth presets (cut to hidden 64) keep their activations
bounded and decode varied tokens; the multi-file split reads back like one file; the tokenizer has the
preset's exact vocabulary and loads with AutoTokenizer and in an engine."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tp_runtime.convert.checkpoint import open_checkpoint
from tp_runtime.convert.pipeline import convert
from tp_runtime.convert.synthetic import load_preset, write_synthetic
from tp_runtime.convert.synthetic_tokenizer import build_tokenizer, write_tokenizer

PROMPTS = ["The town council voted on Tuesday", "def fibonacci(n):", "Quantum computers are"]


def narrow(name: str, vocab_size: int = 1024, **overrides) -> dict:
    """A preset at its full depth, hidden 64 and 4 heads (2 KV heads where it has GQA)."""
    cfg = load_preset(name)
    gated = cfg.get("hidden_act", "silu") == "silu"
    small = dict(cfg, hidden_size=64, intermediate_size=170 if gated else 256, num_attention_heads=4,
                 vocab_size=vocab_size)
    if "num_key_value_heads" in cfg:
        small["num_key_value_heads"] = 2
    small.update(overrides)
    return small


@pytest.mark.parametrize("preset, depth", [("internlm2-20b", 48), ("gpt-neox-20b", 44)])
def test_full_depth_stays_bounded_and_decodes_varied_tokens(preset, depth, tmp_path):
    from tp_runtime import LLM, SamplingParams

    cfg = narrow(preset)
    write_synthetic(cfg, str(tmp_path / "hf"), dtype="float32", progress=False)
    convert(str(tmp_path / "hf"), str(tmp_path / "e"), 1, progress=False, max_seq_len=64)
    llm = LLM(str(tmp_path / "e"), max_batch_size=3, max_seq_len=64)
    assert len(llm.model.layers) == depth
    rms = []  # the residual stream after each layer, prefill of the three prompts first
    hooks = [layer.register_forward_hook(lambda m, a, out: rms.append(out.float().pow(2).mean().sqrt().item()))
             for layer in llm.model.layers]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, greedy=True, ignore_eos=True))
    for h in hooks:
        h.remove()
    prefill = rms[:depth]
    assert all(torch.isfinite(torch.tensor(prefill)))
    # measured: InternLM2 1.03 -> 1.16, GPT-NeoX 1.00 -> 1.20 (first layer -> last)
    assert 0.1 < prefill[-1] / prefill[0] < 10, prefill
    assert all(0.5 < r < 5 for r in prefill), prefill
    distinct = [len(set(o.output_ids)) for o in outs]
    assert all(len(o.output_ids) == 16 for o in outs)
    assert min(distinct) >= 4, distinct  # measured: InternLM2 6, 15, 16; GPT-NeoX 16, 16, 16
    assert all(o.text for o in outs)

    # the engine's tokenizer is the synthetic one, whatever the family (InternLM2's LlamaTokenizer
    # override is only for a checkpoint with a SentencePiece tokenizer.model)
    from transformers import AutoTokenizer

    with open(tmp_path / "e" / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    source = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert [o.input_ids for o in outs] == [source(p)["input_ids"] for p in PROMPTS]
    chat = llm.encode("Hello", chat_template=True)  # the chat route's template applies
    assert chat.count(llm.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2


def test_shards_with_an_index_read_back_like_one_file(tmp_path):
    cfg = narrow("internlm2-20b", vocab_size=300, num_hidden_layers=3)
    write_synthetic(cfg, str(tmp_path / "one"), dtype="bfloat16", progress=False, tokenizer=False)
    write_synthetic(cfg, str(tmp_path / "many"), dtype="bfloat16", progress=False, shard_size="40KB",
                    tokenizer=False)
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    with open(tmp_path / "many" / "model.safetensors.index.json") as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                        for i in range(1, len(files) + 1)]
    one, many = open_checkpoint(str(tmp_path / "one")), open_checkpoint(str(tmp_path / "many"))
    assert one.names() == many.names() and sorted(index["weight_map"]) == sorted(one.names())
    total = 0
    for name in one.names():
        a, b = one.load(name), many.load(name)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
        total += a.numel() * 2
    assert index["metadata"]["total_size"] == total
    for fname in files:  # at most 40 KB each, unless one tensor alone is bigger
        tensors = [n for n, f in index["weight_map"].items() if f == fname]
        size = sum(many.load(n).numel() * 2 for n in tensors)
        assert size <= 40_000 or len(tensors) == 1
    convert(str(tmp_path / "one"), str(tmp_path / "e1"), 2, progress=False)
    convert(str(tmp_path / "many"), str(tmp_path / "e2"), 2, progress=False)
    for r in range(2):
        assert (tmp_path / "e1" / f"rank{r}.safetensors").read_bytes() == \
            (tmp_path / "e2" / f"rank{r}.safetensors").read_bytes()


@pytest.mark.parametrize("preset", ["internlm2-20b", "gpt-neox-20b"])
def test_tokenizer_has_the_exact_vocabulary_and_round_trips(preset, tmp_path):
    from transformers import AutoTokenizer

    cfg = load_preset(preset)
    V = cfg["vocab_size"]
    write_tokenizer(cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    with open(tmp_path / "tokenizer.json") as f:
        assert sorted(json.load(f)["model"]["vocab"].values()) == list(range(V))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == V
    tokens = tok.convert_ids_to_tokens(list(range(V)))
    assert None not in tokens and len(set(tokens)) == V  # every id the model can emit decodes
    assert tok.decode(list(range(V - 200, V)), skip_special_tokens=True)

    text = "The council voted 7-2 on Tuesday; naïve café, Straße, 東京 and 🙂 still round-trip.\n\tdef f(x): pass"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < V and len(ids) < len(text.encode())
    bos, eos = cfg["bos_token_id"], cfg["eos_token_id"]
    assert tok.eos_token_id == eos and tok.bos_token_id == bos
    with_specials = tok(text)["input_ids"]
    assert with_specials == ([bos] + ids if bos != eos else ids)  # Llama-style bos; GPT-NeoX adds nothing

    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi there<|im_end|>\n" in chat
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2 and max(chat_ids) < V
    assert (chat_ids[0] == bos) == (bos != eos)

    again, _ = build_tokenizer(cfg)  # deterministic
    with open(tmp_path / "tokenizer.json") as f:
        assert json.loads(again.to_str()) == json.load(f)


@pytest.mark.slow
def test_cli_writes_shards_and_shows_its_defaults(tmp_path):
    cfg = narrow("gpt-neox-20b", vocab_size=300, num_hidden_layers=2)
    (tmp_path / "preset.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-m", "tp_runtime.synthetic", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and "(default: 5GB)" in " ".join(res.stdout.split()) and "--no_tokenizer" in res.stdout
    res = subprocess.run([sys.executable, "-m", "tp_runtime.synthetic", "--config", str(tmp_path / "preset.json"),
                          "--output_dir", str(tmp_path / "hf"), "--num_layers", "1", "--shard_size", "100KB"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    names = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 1
    assert "embed_out.weight" in open_checkpoint(str(tmp_path / "hf")).names()  # GPT-NeoX's published name
    res = subprocess.run([sys.executable, "-m", "tp_runtime.synthetic", "--config", str(tmp_path / "preset.json"),
                          "--output_dir", str(tmp_path / "x"), "--shard_size", "lots"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "--shard_size 'lots' is not a size" in res.stderr
