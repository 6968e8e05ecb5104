"""The runtime against transformers' own implementation, on tiny random checkpoints, at several tp.

Each checkpoint is built with transformers' classes; every batch row gets a different prompt of a
different length; the engine's greedy ids must equal transformers' (by full forwards), and its
log-probs must match within 1e-3 (fp32).
"""

import pytest
import torch

from helpers import build_checkpoint, in_process_outputs, reference_greedy, reference_logprobs, tp_run_json
from tp_runtime.convert.pipeline import convert

pytestmark = pytest.mark.slow  # every tp size against transformers: a process per rank and check

NEW_TOKENS = 8

CASES = {
    # name: (arch, overrides, tp sizes)
    "llama-gqa-uneven": ("llama", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                                       intermediate_size=100, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}), (1, 2, 3)),
    "llama-mha-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, vocab_size=101,
                                     tie_word_embeddings=True, head_dim=24), (1, 2, 3)),
    "qwen2-qkv-bias": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48,
                                     intermediate_size=64, vocab_size=100), (1, 2, 3)),
    "mistral-window-kv-replicated": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                                                     sliding_window=5, num_hidden_layers=3), (1, 2, 4)),
}


def prompts_for(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 7, 16]  # different per row, and longer than the sliding window
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    arch, overrides, tps = CASES[name]
    root = tmp_path_factory.mktemp(name)
    model = build_checkpoint(str(root / "hf"), arch, seed=len(name), **overrides)
    return name, model, root, tps


def test_matches_transformers_at_every_tp(case):
    name, model, root, tps = case
    prompts = prompts_for(model.config.vocab_size, seed=len(name))
    expected = [reference_greedy(model, p, NEW_TOKENS) for p in prompts]
    for tp in tps:
        engine = str(root / f"tp{tp}")
        convert(str(root / "hf"), engine, tp, progress=False)
        if tp == 1:  # the runtime in this process (tp-run's own path: test_cli, test_real_model)
            out = in_process_outputs(engine, prompts, NEW_TOKENS)
        else:
            out = tp_run_json(engine, tp, ["--input_ids", *(",".join(map(str, p)) for p in prompts),
                                           "--max_output_len", str(NEW_TOKENS), "--ignore_eos"])
        for row, (p, o) in enumerate(zip(prompts, out["outputs"], strict=True)):
            assert o["input_ids"] == p
            assert o["output_ids"] == expected[row], f"{name} tp={tp} row {row}"
            ref = reference_logprobs(model, p, o["output_ids"])
            diff = max(abs(a - b) for a, b in zip(ref, o["output_logprobs"], strict=True))
            assert diff < 1e-3, f"{name} tp={tp} row {row}: log-probs differ by {diff}"
            assert o["finish_reason"] == "length"


def test_bf16_checkpoint_keeps_dtype_and_computes_in_fp32(tmp_path):
    model = build_checkpoint(str(tmp_path / "hf"), "llama", seed=7, dtype=torch.bfloat16,
                             num_attention_heads=4, num_key_value_heads=2)
    cfg = convert(str(tmp_path / "hf"), str(tmp_path / "e"), 2, progress=False)
    assert cfg.dtype == "bfloat16"  # --dtype auto keeps the checkpoint's dtype
    prompt = [5, 9, 11, 40, 2, 7]
    out = tp_run_json(str(tmp_path / "e"), 2, ["--input_ids", ",".join(map(str, prompt)), "--max_output_len", "6",
                                                "--ignore_eos", "--dtype", "float32"])
    o = out["outputs"][0]
    # model holds the bf16 weights upcast to fp32, as the engine computes them
    assert o["output_ids"] == reference_greedy(model, prompt, 6)
    ref = reference_logprobs(model, prompt, o["output_ids"])
    assert max(abs(a - b) for a, b in zip(ref, o["output_logprobs"], strict=True)) < 1e-3


@pytest.mark.parametrize("tied", [True, False])
def test_vocab_parallel_embedding(tied, tmp_path):
    """--use_parallel_embedding: the embedding split by vocab rows (101 rows: padded, uneven) and all-reduced;
    a tied head is then stored once and shared with it."""
    from helpers import assert_engine_matches, random_prompts
    from safetensors import safe_open

    model = build_checkpoint(str(tmp_path / "hf"), "llama", seed=31, vocab_size=101, tie_word_embeddings=tied,
                             num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    for tp in (2, 3):
        engine = str(tmp_path / f"tp{tp}")
        cfg = convert(str(tmp_path / "hf"), engine, tp, progress=False, parallel_embedding=True)
        assert cfg.use_parallel_embedding
        with safe_open(f"{engine}/rank{tp - 1}.safetensors", "pt") as f:
            assert f.get_slice("transformer.vocab_embedding.weight").get_shape() == [cfg.vocab_size_padded // tp, 48]
            assert ("lm_head.weight" in f.keys()) == (not tied)
        assert_engine_matches(model, engine, tp, random_prompts(101, 32), label=f"parallel embedding tied={tied}")
