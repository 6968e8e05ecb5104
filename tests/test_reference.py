"""The converter's layer-by-layer reference forward (convert/reference.py) against transformers' own models,
one tiny random checkpoint per family and canonical switch, different prompts per batch row."""

import pytest
import torch

from helpers import build_checkpoint
from test_families import tiny, write_as_exaone3, write_as_internlm2
from tp_runtime.convert.adapters import get_adapter
from tp_runtime.convert.checkpoint import open_checkpoint
from tp_runtime.convert.reference import ACTIVATIONS, LINEAR_INPUTS, ReferenceDecoder
from tp_runtime.engine import format as ef


def reference(hf_dir) -> ReferenceDecoder:
    adapter = get_adapter(open_checkpoint(str(hf_dir)))
    fields = adapter.config()
    return ReferenceDecoder(adapter.tensors(fields), fields)


def assert_matches(model, hf_dir, vocab: int, seed: int, lengths=(9, 14)):
    """Logits of the reference and of transformers within 1e-4, on batches of 3 different prompts."""
    ref = reference(hf_dir)
    g = torch.Generator().manual_seed(seed)
    for T in lengths:
        ids = torch.randint(3, vocab, (3, T), generator=g)  # a different prompt per row
        with torch.no_grad():
            want = model(ids).logits.float()
            got = ref.forward(ids)
        assert got.shape == want.shape
        diff = (got - want).abs().max().item()
        assert diff < 1e-4, f"T={T}: logits differ by {diff}"
        assert not torch.equal(got[0], got[1])


def save_llama(tmp_path, arch="llama", seed=21, **kw):
    model = build_checkpoint(str(tmp_path / "hf"), arch, seed=seed, **kw)
    return model, tmp_path / "hf"


LLAMA_VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-biases-llama3-rope": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 8})),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "qwen2-window-layers": ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                          max_window_layers=1)),
    "llama-relu-no-gqa": ("llama", dict(hidden_act="relu", num_key_value_heads=4,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_family(variant, tmp_path):
    arch, kw = LLAMA_VARIANTS[variant]
    model, hf = save_llama(tmp_path, arch, **kw)
    assert_matches(model, hf, 103, 1)


@pytest.mark.parametrize("variant", ["hybrid-LLG", "full-llama3-rope"])
def test_exaone4(variant, tmp_path):
    from test_families import EXAONE4
    from transformers import Exaone4Config, Exaone4ForCausalLM

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(EXAONE4[variant])
    model = tiny(Exaone4Config, Exaone4ForCausalLM, 11, **kw)
    model.save_pretrained(tmp_path / "hf")
    assert_matches(model, tmp_path / "hf", 97, 2)


@pytest.mark.parametrize("parallel,pct,heads", [(True, 0.25, 4), (False, 0.5, 6)])
def test_gpt_neox(parallel, pct, heads, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = tiny(GPTNeoXConfig, GPTNeoXForCausalLM, 12, vocab_size=101, hidden_size=heads * 16,
                 intermediate_size=100, num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=256,
                 use_parallel_residual=parallel, rotary_pct=pct, rotary_emb_base=10000, hidden_act="gelu",
                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=2)
    model.save_pretrained(tmp_path / "hf")
    assert_matches(model, tmp_path / "hf", 101, 3)


def test_exaone3_renamed_llama(tmp_path):
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=13, num_attention_heads=6, num_key_value_heads=3,
                             hidden_size=48, tie_word_embeddings=True)
    write_as_exaone3(tmp_path / "llama", tmp_path / "hf", model.config.to_dict())
    assert_matches(model, tmp_path / "hf", 103, 4)


@pytest.mark.parametrize("bias,rope", [(True, "linear"), (False, "dynamic")])
def test_internlm2_renamed_llama(bias, rope, tmp_path):
    """Grouped wqkv; dynamic NTK RoPE on prompts longer than max_position_embeddings (12)."""
    kw = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, attention_bias=bias,
              rope_scaling={"rope_type": rope, "factor": 2.0})
    if rope == "dynamic":
        kw["max_position_embeddings"] = 12
    model = build_checkpoint(str(tmp_path / "llama"), "llama", seed=14, **kw)
    write_as_internlm2(tmp_path / "llama", tmp_path / "hf", model.config.to_dict(),
                       rope_scaling={"type": rope, "factor": 2.0})
    assert_matches(model, tmp_path / "hf", 103, 5, lengths=(9, 17))


def test_layer_forward_reports_the_linear_inputs_and_frees_the_layer(tmp_path):
    """The four recorded inputs are the inputs of transformers' own linears; chunked rows give the same
    output; layer i loads only layer i's tensors."""
    model, hf = save_llama(tmp_path)
    ref = reference(hf)
    ids = torch.randint(3, 103, (3, 10), generator=torch.Generator().manual_seed(6))
    seen, hooks = {}, []
    layer = model.model.layers[1]
    for key, mod in (("qkv", layer.self_attn.q_proj), ("dense", layer.self_attn.o_proj),
                     ("fc_gate", layer.mlp.gate_proj), ("proj", layer.mlp.down_proj)):
        hooks.append(mod.register_forward_pre_hook(lambda m, a, key=key: seen.__setitem__(key, a[0].detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    loads = []
    for ct in ref.tensors.values():
        ct.load = (lambda f, n: lambda meta: (loads.append(n), f(meta))[1])(ct.load, ct.name)
    x = ref.layer_forward(0, ref.embed(ids))
    loads.clear()
    got = {}
    y = ref.layer_forward(1, x, record=lambda key, v: got.setdefault(key, []).append(v), max_tokens=10)
    assert set(got) == set(LINEAR_INPUTS) and all(len(v) == 3 for v in got.values())  # one row per chunk
    for key in LINEAR_INPUTS:
        assert (torch.cat(got[key]) - seen[key]).abs().max() < 1e-5, key
    p = ef.layer_prefix(1) + "."
    assert sorted(loads) == sorted(n for n in ref.tensors if n.startswith(p))  # each of layer 1's, once
    assert (y - ref.layer_forward(1, x)).abs().max() < 1e-5


def test_activations_are_the_runtimes():
    assert set(ACTIVATIONS) == set(ef.ACTIVATIONS)
