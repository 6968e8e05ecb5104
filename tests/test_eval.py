"""tp-eval and LLM.score: scores and perplexity equal transformers' at tp 1 and 2, the sliding window
scores each token once, summarize's ROUGE equals rouge-score's, bad input fails in one line."""

import json
import math
import sys
import textwrap

import pytest
import torch

from helpers import build_checkpoint, run_ranks
from tp_runtime import LLM
from tp_runtime.convert.pipeline import convert
from tp_runtime.cli.eval import main as tp_eval
from tp_runtime.cli.perplexity import sliding_windows
from tp_runtime.cli.summarize import DEFAULT_DATA, read_data

EVAL = [sys.executable, "-m", "tp_runtime.cli.eval"]


def train_tokenizer(path: str, texts: list[str]):
    """A small byte-level BPE (300 ids: <pad>=0, <s>=1, </s>=2) with a chat template, saved to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    samples = read_data(DEFAULT_DATA)
    text = "\n\n".join(s["article"] for s in samples)
    tok = train_tokenizer(str(root / "hf"), [s["article"] + " " + s["summary"] for s in samples])
    model = build_checkpoint(str(root / "hf"), "llama", seed=7, vocab_size=len(tok), num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=1024)  # room for an article
    for tp in (1, 2):
        convert(str(root / "hf"), str(root / f"tp{tp}"), tp, progress=False)
    (root / "text.txt").write_text(text)
    return root, model, tok, text


def reference_scores(model, seq: list[int], start: int) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    return [lp[i - 1, seq[i]].item() for i in range(start, len(seq))]


def reference_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int, set]:
    """The guide's loop written out here: windows every `stride`, scoring only the tokens past the last
    window's end, by full forwards and log-softmax. Returns (perplexity, tokens scored, their indices)."""
    nll, scored, prev_end = 0.0, [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        lps = reference_scores(model, ids[begin:end], max(prev_end - begin, 1))
        nll -= sum(lps)
        scored += range(end - len(lps), end)
        prev_end = end
        if end == len(ids):
            break
    assert len(scored) == len(set(scored))
    return math.exp(nll / len(scored)), len(scored), set(scored)


def test_sliding_windows_score_each_token_once():
    for n, w, s in [(1000, 128, 64), (1000, 128, 128), (130, 128, 64), (7, 4, 1), (2, 16, 8), (1025, 512, 100)]:
        windows = sliding_windows(n, w, s)
        scored = [i for b, e, start in windows for i in range(b + start, e)]
        assert len(scored) == len(set(scored)), (n, w, s)
        assert all(e - b <= w and start >= 1 for b, e, start in windows)
        if s < w:  # overlap: every token but the first, each with at least w - s tokens of context
            assert sorted(scored) == list(range(1, n))
            assert all(start >= min(w - s, e - b - 1) or b == 0 for b, e, start in windows)
        else:  # no overlap: each window's first token has no context and is skipped, as in the guide
            assert sorted(scored) == [i for i in range(1, n) if i % w]


SCORE_SCRIPT = textwrap.dedent("""
    import json, sys
    from tp_runtime import LLM
    llm = LLM(sys.argv[1], max_batch_size=2)
    seqs, starts = json.loads(sys.argv[2])
    out = llm.score(seqs, starts)
    if llm.rank == 0:
        json.dump(out, open(sys.argv[3], "w"))
    llm.close()
""")


def test_score_equals_transformers_tp1_tp2(setup, tmp_path):
    root, model, _, _ = setup
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (40, 9, 57, 23, 2)]
    starts = [1, 3, 30, 22, 1]
    ref = [reference_scores(model, s, k) for s, k in zip(seqs, starts, strict=True)]
    alone = LLM(str(root / "tp1"), max_batch_size=2).score(seqs, starts)  # 3 batches of different rows
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    res = run_ranks(2, [sys.executable, str(script), str(root / "tp2"), json.dumps([seqs, starts]),
                        str(tmp_path / "out.json")])
    assert res.returncode == 0, res.stderr
    tp2 = json.loads((tmp_path / "out.json").read_text())
    for row, (r, a, b) in enumerate(zip(ref, alone, tp2, strict=True)):
        assert len(r) == len(a) == len(b) == len(seqs[row]) - starts[row]
        assert max(abs(x - y) for x, y in zip(r, a, strict=True)) < 1e-4, f"tp=1 row {row}"
        assert max(abs(x - y) for x, y in zip(r, b, strict=True)) < 1e-4, f"tp=2 row {row}"


def check_perplexity(out: dict, model, tok, text: str, window: int, stride: int, max_tokens: int):
    ids = tok(text)["input_ids"][:max_tokens]
    ppl, count, _ = reference_perplexity(model, ids, window, stride)
    assert out["tokens"] == max_tokens and out["tokens_scored"] == count == max_tokens - 1
    assert abs(out["perplexity"] / ppl - 1) < 1e-5, (out["perplexity"], ppl)
    assert abs(out["transformers"]["perplexity"] / ppl - 1) < 1e-5
    assert out["transformers"]["tokens_scored"] == count


@pytest.mark.slow
@pytest.mark.parametrize("tp,launcher", [(1, None), (2, "env"), (2, "mpirun")])
def test_perplexity_equals_transformers(setup, tmp_path, tp, launcher):
    root, model, tok, text = setup
    out = tmp_path / "ppl.json"
    argv = ["perplexity", "--engine", str(root / f"tp{tp}"), "--text_file", str(root / "text.txt"),
            "--max_tokens", "300", "--window", "64", "--stride", "24", "--hf_model_dir", str(root / "hf"),
            "--output_json", str(out)]
    if launcher is None:
        assert tp_eval(argv) == 0
    else:
        res = run_ranks(tp, [*EVAL, *argv], launcher)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("perplexity (engine)") == 1  # rank 0 alone prints
    check_perplexity(json.loads(out.read_text()), model, tok, text, 64, 24, 300)


def test_summarize_end_to_end(setup, tmp_path):
    from rouge_score import rouge_scorer

    root, _, _, _ = setup
    out = tmp_path / "sum.json"
    assert tp_eval(["summarize", "--engine", str(root / "tp1"), "--hf_model_dir", str(root / "hf"),
                    "--max_samples", "2", "--max_output_len", "12", "--output_json", str(out)]) == 0
    data = json.loads(out.read_text())
    refs = [s["summary"] for s in read_data(DEFAULT_DATA, 2)]
    assert [s["reference"] for s in data["samples"]] == refs
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for side in ("engine", "transformers"):
        texts = [s[side]["text"] for s in data["samples"]]
        assert all(texts)
        for key in ("rouge1", "rouge2", "rougeL"):
            direct = 100 * sum(scorer.score(r, t)[key].fmeasure for r, t in zip(refs, texts, strict=True)) / 2
            assert abs(data[side][key] - direct) < 1e-9
        assert data[side]["output_tokens"] == sum(len(s[side]["output_ids"]) for s in data["samples"])
        assert data[side]["tokens_per_s"] > 0
    # the same greedy model on the same prompt ids: the same summaries
    assert [s["engine"]["output_ids"] for s in data["samples"]] == [s["transformers"]["output_ids"]
                                                                      for s in data["samples"]]
    assert data["identical_summaries"] == 2
    assert data["samples"][0]["input_ids"] != data["samples"][1]["input_ids"]


@pytest.mark.parametrize("case,needle", [
    ("missing_text", "does not exist"),
    ("empty_text", "is empty"),
    ("long_window", "longer than the engine's max_seq_len 1024"),
    ("bad_stride", "--stride must be in"),
    ("bad_jsonl", "line 2 is not valid JSON"),
    ("jsonl_fields", "line 1 needs non-empty string fields"),
    ("empty_jsonl", "has no samples"),
])
def test_bad_input_one_line_exit_2(setup, tmp_path, capsys, case, needle):
    root = setup[0]
    engine = ["--engine", str(root / "tp1")]
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "bad.jsonl").write_text('{"article": "a", "summary": "b"}\n{"article": "a",\n')
    (tmp_path / "fields.jsonl").write_text('{"article": "a", "highlight": "b"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    argv = {
        "missing_text": ["perplexity", *engine, "--text_file", str(tmp_path / "nope.txt")],
        "empty_text": ["perplexity", *engine, "--text_file", str(tmp_path / "empty.txt")],
        "long_window": ["perplexity", *engine, "--window", "1025"],
        "bad_stride": ["perplexity", *engine, "--window", "64", "--stride", "65"],
        "bad_jsonl": ["summarize", *engine, "--data", str(tmp_path / "bad.jsonl")],
        "jsonl_fields": ["summarize", *engine, "--data", str(tmp_path / "fields.jsonl")],
        "empty_jsonl": ["summarize", *engine, "--data", str(tmp_path / "empty.jsonl")],
    }[case]
    with pytest.raises(SystemExit) as e:
        tp_eval(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_from_the_command_line(setup):
    res = run_ranks(1, [*EVAL, "perplexity", "--engine", str(setup[0] / "tp1"), "--text_file", "/nonexistent.txt"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: --text_file /nonexistent.txt does not exist"
