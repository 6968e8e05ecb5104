"""SmolLM2-135M-Instruct (the real model, fp32): greedy ids equal transformers' generate at tp=1 and
tp=2, through the real mpirun (MPICH from PyPI) and torchrun. Where they part, the two candidates'
log-probs must be within 1e-4 (a tie that summation order may break); anything else fails."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from helpers import run_ranks, tool, tp_run_json
from tp_runtime.convert.pipeline import convert

NEW = 32
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea, then explain each line of it."]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines(smollm2_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    return {tp: str(convert(smollm2_hf, str(root / f"tp{tp}"), tp, progress=False) and root / f"tp{tp}")
            for tp in (1, 2)}


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()


def assert_same_greedy(model, input_ids, ours, ours_lp):
    with torch.no_grad():
        ref = model.generate(torch.tensor([input_ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones(1, len(input_ids), dtype=torch.long))[0, len(input_ids):].tolist()
    if ours == ref:
        return
    i = next(k for k, (a, b) in enumerate(zip(ours, ref)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([input_ids + ours[:i]])).logits[0, -1].float()
    lp = torch.log_softmax(logits, -1)
    gap = abs(lp[ours[i]].item() - lp[ref[i]].item())
    assert gap < 1e-4, f"outputs part at token {i}: ours {ours[i]} vs transformers {ref[i]}, log-prob gap {gap}"
    assert abs(ours_lp[i] - lp[ours[i]].item()) < 1e-3


@pytest.mark.parametrize("tp,launcher", [(1, "env"), (2, "mpirun"), (2, "torchrun")])
def test_greedy_matches_transformers(engines, hf_model, tp, launcher):
    out = tp_run_json(engines[tp], tp, ["--input_text", *PROMPTS, "--max_output_len", str(NEW), "--ignore_eos"],
                      launcher=launcher)
    assert len(out["outputs"]) == len(PROMPTS)
    for o in out["outputs"]:
        assert len(o["output_ids"]) == NEW and o["finish_reason"] == "length"
        assert_same_greedy(hf_model, o["input_ids"], o["output_ids"], o["output_logprobs"])
    assert set(out["timings"]) == {"ttft_ms", "decode_tokens_per_s", "prefill_tokens_per_s", "total_s"}


def test_chat_template_and_eos(engines, smollm2_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    out = tp_run_json(engines[1], 1, ["--input_text", PROMPTS[0], "--max_output_len", "64"])
    o = out["outputs"][0]
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True)
    assert o["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert o["finish_reason"] == "stop" and tok.eos_token_id not in o["output_ids"]  # stopped on <|im_end|>
    assert "Paris" in o["text"]


def test_streaming_equals_plain_and_rank0_prints_alone(engines):
    args = [tool("tp-run"), "--engine", engines[2], "--input_text", PROMPTS[0], "--max_output_len", "24"]
    plain = run_ranks(2, args, "mpirun")
    streamed = run_ranks(2, args + ["--streaming"], "mpirun")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    line = next(x for x in plain.stdout.splitlines() if x.startswith("Output [Text 0 Beam 0]: "))
    text = json.loads(line.split(": ", 1)[1])
    assert streamed.stdout.strip() == text.strip()
    assert plain.stdout.count("Output [Text 0") == 1  # rank 1 prints nothing


def test_stop_words(engines):
    out = tp_run_json(engines[2], 2, ["--input_text", "Count from 1 to 20, separated by commas.",
                                      "--max_output_len", "60", "--stop_words", "5"])
    o = out["outputs"][0]
    assert o["finish_reason"] == "stop" and "5" not in o["text"] and "4" in o["text"]


def test_gguf_converts_to_the_same_engine(engines, tmp_path):
    from tp_runtime.assets import fetch_smollm2_gguf

    gguf_engine = str(tmp_path / "gguf_tp2")
    convert(fetch_smollm2_gguf(), gguf_engine, 2, progress=False)
    for r in range(2):
        with safe_open(os.path.join(gguf_engine, f"rank{r}.safetensors"), "pt") as a, \
             safe_open(os.path.join(engines[2], f"rank{r}.safetensors"), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    assert os.path.isfile(os.path.join(gguf_engine, "tokenizer.json"))
