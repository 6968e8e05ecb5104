"""Every family of the mission against an independent reference, at several tp, fp32.

EXAONE-4.0 and GPT-NeoX: transformers' own classes on tiny random checkpoints.
EXAONE-3 and InternLM2 are remote code, not in transformers: the tests write a random
LlamaForCausalLM under their names and layouts (the layout code below follows the families'
published descriptions, independently of the converter's adapters) and compare against
LlamaForCausalLM on the original weights.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_engine_matches, build_checkpoint, random_prompts, run_ranks, tool
from tp_runtime.convert.pipeline import convert
from tp_runtime.errors import UserError

pytestmark = pytest.mark.slow  # each family at several tp sizes: a process per rank and check


def tiny(cls_cfg, cls_model, seed, **kw):
    torch.manual_seed(seed)
    model = cls_model(cls_cfg(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def check(model, root, tps, prompts, incremental=False, label=""):
    for tp in tps:
        engine = str(root / f"tp{tp}")
        convert(str(root / "hf"), engine, tp, progress=False)
        assert_engine_matches(model, engine, tp, prompts, incremental=incremental, label=label)


# ---------------------------------------------------------------- EXAONE-4.0

EXAONE4 = {
    "hybrid-LLG": dict(sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "hybrid-LGLG": dict(num_hidden_layers=4, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    "full-llama3-rope": dict(sliding_window=None, layer_types=["full_attention"] * 3,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("variant", list(EXAONE4))
def test_exaone4(variant, tmp_path):
    from transformers import Exaone4Config, Exaone4ForCausalLM

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(EXAONE4[variant])
    model = tiny(Exaone4Config, Exaone4ForCausalLM, 11, **kw)
    model.save_pretrained(tmp_path / "hf")
    # prompts longer than the window (4-5) in every row; tp=4 (KV heads replicated) once, on the hybrid layers
    tps = (1, 2, 4) if variant == "hybrid-LLG" else (1, 2)
    check(model, tmp_path, tps, random_prompts(97, 5, (6, 13, 9)), label=f"exaone4 {variant}")


# ---------------------------------------------------------------- GPT-NeoX

@pytest.mark.parametrize("parallel,pct,heads,tps", [(True, 0.25, 4, (1, 2, 4)), (False, 0.5, 6, (1, 2, 3))])
def test_gpt_neox(parallel, pct, heads, tps, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = tiny(GPTNeoXConfig, GPTNeoXForCausalLM, 12, vocab_size=101, hidden_size=heads * 16,
                 intermediate_size=100, num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=256,
                 use_parallel_residual=parallel, rotary_pct=pct, rotary_emb_base=10000, hidden_act="gelu",
                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=2)
    assert model.config.rope_parameters["partial_rotary_factor"] == pct
    model.save_pretrained(tmp_path / "hf")
    check(model, tmp_path, tps, random_prompts(101, 6), label=f"neox parallel={parallel}")


# ---------------------------------------------------------------- EXAONE-3 (Llama math, other names)

def write_as_exaone3(llama_dir, out_dir, config: dict):
    """Rename a Llama checkpoint as EXAONE-3 (transformer.wte, h.{i}.ln_1, attn.attention.*, mlp.c_fc_0 ...)."""
    sd = load_file(str(llama_dir / "model.safetensors"))
    ren = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight",
           "lm_head.weight": "lm_head.weight"}
    parts = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.q_proj": "attn.attention.q_proj",
             "self_attn.k_proj": "attn.attention.k_proj", "self_attn.v_proj": "attn.attention.v_proj",
             "self_attn.o_proj": "attn.attention.out_proj", "mlp.gate_proj": "mlp.c_fc_0", "mlp.up_proj": "mlp.c_fc_1",
             "mlp.down_proj": "mlp.c_proj"}
    out = {}
    for k, v in sd.items():
        if k in ren:
            out[ren[k]] = v
            continue
        _, _, i, rest = k.split(".", 3)
        module, param = rest.rsplit(".", 1)
        out[f"transformer.h.{i}.{parts[module]}.{param}"] = v
    out_dir.mkdir()
    save_file(out, str(out_dir / "model.safetensors"))
    exaone = {"architectures": ["ExaoneForCausalLM"], "model_type": "exaone", "vocab_size": config["vocab_size"],
              "hidden_size": config["hidden_size"], "num_layers": config["num_hidden_layers"],
              "num_attention_heads": config["num_attention_heads"], "num_key_value_heads": config["num_key_value_heads"],
              "intermediate_size": config["intermediate_size"], "max_position_embeddings": 256,
              "activation_function": "silu", "layer_norm_epsilon": config["rms_norm_eps"], "rope_theta": 10000.0,
              "rope_scaling": config.get("rope_scaling"), "tie_word_embeddings": config["tie_word_embeddings"],
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    (out_dir / "config.json").write_text(json.dumps(exaone))


@pytest.mark.parametrize("tied", [False, True])
def test_exaone3(tied, tmp_path):
    kw = dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, tie_word_embeddings=tied)
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=13, **kw)
    write_as_exaone3(tmp_path / "llama", tmp_path / "hf", model.config.to_dict())
    # tp=3 (3 KV groups, one per rank) untied; the tied head at tp 1 and 2
    check(model, tmp_path, (1, 2) if tied else (1, 2, 3), random_prompts(103, 7), label=f"exaone3 tied={tied}")


# ---------------------------------------------------------------- InternLM2 (grouped wqkv)

def write_as_internlm2(llama_dir, out_dir, config: dict, rope_scaling=None):
    """Rename a Llama checkpoint as InternLM2, with q/k/v regrouped into wqkv: for each KV head, its
    heads/kv query heads, then its key head, then its value head."""
    sd = load_file(str(llama_dir / "model.safetensors"))
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    D = config["hidden_size"] // H
    G = H // K
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        q, k, v = (sd[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv")
        rows = []
        for g in range(K):
            rows += [q[(g * G + j) * D:(g * G + j + 1) * D] for j in range(G)]
            rows += [k[g * D:(g + 1) * D], v[g * D:(g + 1) * D]]
        out[f"{p}.attention.wqkv.weight"] = torch.cat(rows)
        out[f"{p}.attention.wo.weight"] = sd[f"{p}.self_attn.o_proj.weight"]
        if f"{p}.self_attn.q_proj.bias" in sd:  # InternLM2's `bias: true`: wqkv and wo carry biases
            qb, kb, vb = (sd[f"{p}.self_attn.{n}_proj.bias"] for n in "qkv")
            brows = []
            for g in range(K):
                brows += [qb[g * G * D:(g + 1) * G * D], kb[g * D:(g + 1) * D], vb[g * D:(g + 1) * D]]
            out[f"{p}.attention.wqkv.bias"] = torch.cat(brows)
            out[f"{p}.attention.wo.bias"] = sd[f"{p}.self_attn.o_proj.bias"]
        out[f"{p}.feed_forward.w1.weight"] = sd[f"{p}.mlp.gate_proj.weight"]
        out[f"{p}.feed_forward.w3.weight"] = sd[f"{p}.mlp.up_proj.weight"]
        out[f"{p}.feed_forward.w2.weight"] = sd[f"{p}.mlp.down_proj.weight"]
        out[f"{p}.attention_norm.weight"] = sd[f"{p}.input_layernorm.weight"]
        out[f"{p}.ffn_norm.weight"] = sd[f"{p}.post_attention_layernorm.weight"]
    out_dir.mkdir()
    save_file(out, str(out_dir / "model.safetensors"))
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
           "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
           "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
           "num_hidden_layers": config["num_hidden_layers"], "num_attention_heads": H, "num_key_value_heads": K,
           "intermediate_size": config["intermediate_size"], "max_position_embeddings": config["max_position_embeddings"],
           "hidden_act": "silu", "rms_norm_eps": config["rms_norm_eps"], "rope_theta": 10000.0,
           "rope_scaling": rope_scaling, "bias": bool(config.get("attention_bias")), "tie_word_embeddings": False,
           "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": "float32"}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


@pytest.mark.parametrize("bias,linear_rope", [(False, False), (True, True)])
def test_internlm2(bias, linear_rope, tmp_path):
    kw = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, attention_bias=bias)
    if linear_rope:
        kw["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=14, **kw)
    write_as_internlm2(tmp_path / "llama", tmp_path / "hf", model.config.to_dict(),
                       rope_scaling={"type": "linear", "factor": 2.0} if linear_rope else None)
    tps = (1, 2) if bias else (1, 2, 4)  # tp=4 (2 KV heads replicated over 4 ranks) once
    check(model, tmp_path, tps, random_prompts(103, 8), label=f"internlm2 bias={bias} linear={linear_rope}")


def test_internlm2_dynamic_ntk_beyond_max_positions(tmp_path):
    """Dynamic NTK RoPE (InternLM2's `dynamic` scaling): prompts that run past max_position_embeddings."""
    kw = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=12,
              rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=15, **kw)
    write_as_internlm2(tmp_path / "llama", tmp_path / "hf", model.config.to_dict(),
                       rope_scaling={"type": "dynamic", "factor": 2.0})
    for tp in (1, 2):
        engine = str(tmp_path / f"tp{tp}")
        convert(str(tmp_path / "hf"), engine, tp, progress=False, max_seq_len=64)
        # one prompt per run: transformers' dynamic RoPE follows the longest row of a batch
        for p in random_prompts(103, 9, (5, 14)):
            assert_engine_matches(model, engine, tp, [p], incremental=True, label="internlm2 dynamic")


# ---------------------------------------------------------------- bad input

def test_missing_config_key_is_named(tmp_path):
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=16)
    write_as_internlm2(tmp_path / "llama", tmp_path / "hf", model.config.to_dict())
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["intermediate_size"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="InternLM2ForCausalLM has no 'intermediate_size'"):
        convert(str(tmp_path / "hf"), str(tmp_path / "e"), 1, progress=False)


def test_unknown_rope_scaling_names_the_supported(tmp_path):
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=17)
    write_as_exaone3(tmp_path / "llama", tmp_path / "hf", model.config.to_dict())
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "su", "factor": 2.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    res = run_ranks(1, [tool("tp-convert"), "--model_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "e")])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "rope scaling type 'su' is not supported; supported: default, linear, dynamic, llama3" in res.stderr


def test_wqkv_size_mismatch_gives_both_sizes(tmp_path):
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=18, num_attention_heads=4, num_key_value_heads=2)
    write_as_internlm2(tmp_path / "llama", tmp_path / "hf", model.config.to_dict())
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the file was grouped for 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"wqkv has 128 rows.*need \(heads \+ 2 x KV heads\) x head_dim = 192"):
        convert(str(tmp_path / "hf"), str(tmp_path / "e"), 1, progress=False)


def test_internlm2_tokenizer_loads_as_sentencepiece_llama_without_remote_code(tmp_path):
    """InternLM2 ships its tokenizer as remote code; the engine loads its tokenizer.model as a
    SentencePiece LlamaTokenizer, and the remote .py is neither copied nor run."""
    import io

    import sentencepiece as spm

    from tp_runtime import LLM

    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=19, num_attention_heads=4, num_key_value_heads=2)
    hf = write_as_internlm2(tmp_path / "llama", tmp_path / "hf", model.config.to_dict())
    text = ["The quick brown fox jumps over the lazy dog.", "Tensor parallel runtimes split heads across ranks."] * 40
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=100, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (hf / "tokenizer.model").write_bytes(buf.getvalue())
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    (hf / "tokenization_internlm2.py").write_text("raise SystemExit('remote code was executed')\n")
    convert(str(hf), str(tmp_path / "e"), 1, progress=False)
    assert not (tmp_path / "e" / "tokenization_internlm2.py").exists()
    tok_cfg = json.loads((tmp_path / "e" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer" and "auto_map" not in tok_cfg
    llm = LLM(str(tmp_path / "e"))
    sentence = "The lazy fox splits heads."
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    assert llm.encode(sentence, chat_template=False) == [1] + sp.encode(sentence)
    assert llm.decode(sp.encode(sentence)) == sentence
