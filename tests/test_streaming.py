"""StreamingLLM (--sink_tokens, --streaming_window) against an exact reference.

With one decoder layer, a cached key or value depends only on its token and its position, so the streaming cache
after any number of slides holds exactly what a plain forward over the kept tokens (the sinks, then the window,
at positions 0, 1, ...) computes: transformers' forward over that shortened sequence is the reference, token by
token, for the generated ids and for the streaming log-probs. It checks the policy (which blocks go) and the
keys' rotation back to their new positions together."""

import pytest
import torch

from helpers import build_checkpoint, tp_run_json
from tp_runtime import LLM, SamplingParams
from tp_runtime.convert.pipeline import convert
from tp_runtime.errors import UserError

VOCAB, BS, SINKS, WINDOW = 97, 4, 4, 8  # 1 sink block + 2 window blocks = 12 positions
CAPACITY = 12


def kept(tokens: list[int], sinks: int) -> list[int]:
    """The tokens a streaming cache holds after len(tokens) fed: the sinks (a whole block, or none), then whole
    window blocks, the oldest dropped a block at a time whenever the next position would pass the capacity."""
    capacity, dropped = (BS if sinks else 0) + WINDOW, 0
    for n in range(len(tokens)):
        if n - dropped + 1 > capacity:
            dropped += BS
    sinks = BS if sinks else 0
    return tokens[:sinks] + tokens[sinks + dropped :]


@torch.no_grad()
def reference_stream(model, prompt: list[int], n: int, sinks: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        ids = kept(tokens, sinks)
        tokens.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = build_checkpoint(str(root / "hf"), "llama", seed=17, num_attention_heads=4, num_key_value_heads=2,
                             hidden_size=64, num_hidden_layers=1, vocab_size=VOCAB)
    for tp in (1, 2):
        convert(str(root / "hf"), str(root / f"tp{tp}"), tp, progress=False)
    return model, root


@pytest.mark.parametrize("sinks", [SINKS, 0])
def test_streaming_generation_equals_the_forward_over_the_kept_tokens(one_layer, sinks):
    model, root = one_layer
    prompts = [[5, 9, 14, 3, 77, 41, 8], [60, 2, 19]]
    # 40 new tokens through a cache of 12 positions (max_seq_len 12): slides every 4 tokens, memory bounded
    llm = LLM(str(root / "tp1"), compile="off", block_size=BS, max_batch_size=2, max_seq_len=CAPACITY,
              streaming_window=WINDOW, sink_tokens=sinks)
    assert llm.num_blocks == 2 * 3 + 1
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    llm.close()
    for p, o in zip(prompts, outs, strict=True):
        assert o.output_ids == reference_stream(model, p, 40, sinks)


def test_streaming_at_tp2_under_the_launcher(one_layer):
    model, root = one_layer
    prompt = [11, 12, 13, 14, 15]
    out = tp_run_json(str(root / "tp2"), 2, ["--input_ids", ",".join(map(str, prompt)), "--max_output_len", "30",
                                              "--ignore_eos", "--block_size", str(BS), "--max_seq_len", str(CAPACITY),
                                              "--streaming_window", str(WINDOW), "--sink_tokens", str(SINKS),
                                              "--compile", "off"])
    assert out["outputs"][0]["output_ids"] == reference_stream(model, prompt, 30, SINKS)


@torch.no_grad()
def test_streaming_scores_equal_the_forward_over_the_kept_tokens(one_layer):
    model, root = one_layer
    text = [(7 * i + 3) % VOCAB for i in range(45)]
    llm = LLM(str(root / "tp1"), compile="off", block_size=BS, max_seq_len=CAPACITY, streaming_window=WINDOW,
              sink_tokens=SINKS)
    got = llm.score_streaming(text)
    llm.close()
    want = []
    for i in range(len(text) - 1):
        ids = kept(text[: i + 1], SINKS)
        want.append(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[text[i + 1]].item())
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


def test_streaming_settings_that_cannot_work_are_clear_errors(one_layer):
    _, root = one_layer
    with pytest.raises(UserError, match="raise --max_seq_len"):
        LLM(str(root / "tp1"), compile="off", block_size=BS, max_seq_len=8, streaming_window=WINDOW)
    llm = LLM(str(root / "tp1"), compile="off", block_size=BS, max_seq_len=CAPACITY, streaming_window=WINDOW)
    with pytest.raises(UserError, match="more than the 12 positions"):
        llm.generate([list(range(13))], SamplingParams(max_tokens=2))
    llm.close()
