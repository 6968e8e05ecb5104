"""Summarization check in the spirit of TensorRT-LLM's examples/summarize.py.

For each article of a jsonl file, the engine's greedy summary and transformers' greedy summary of the
very same prompt ids, ROUGE-1/2/L of each against the reference summary (rouge-score, F-measure, mean
over the articles, x100, no stemming: the defaults of `evaluate`'s rouge that summarize.py uses), and
output tokens per second of each (generated tokens, EOS excluded, over the wall time of the generate
calls, prefill included, as summarize.py counts them).

Prompt: with a chat template, one user turn "Summarize the following article in one or two sentences."
followed by the article; without one, summarize.py's plain form "<article> TL;DR: ".
Data: one JSON object per line with string fields "article" and "summary" (or "highlights", as in
cnn_dailymail). The default file, tp_runtime/data/summaries.jsonl, was written for this project.
"""

import json
import os

from tp_runtime.errors import UserError

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "summaries.jsonl")
INSTRUCTION = "Summarize the following article in one or two sentences."
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def read_data(path: str, max_samples: int | None = None) -> list[dict]:
    """[{"article": ..., "summary": ...}] from a jsonl file, at most max_samples of them."""
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max_samples must be >= 1, got {max_samples}")
    if not os.path.isfile(path):
        raise UserError(f"--data {path} does not exist")
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--data {path} line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            summary = row.get("summary", row.get("highlights")) if isinstance(row, dict) else None
            if not (isinstance(row, dict) and isinstance(row.get("article"), str) and row["article"].strip()
                    and isinstance(summary, str) and summary.strip()):
                raise UserError(f"--data {path} line {n} needs non-empty string fields \"article\" and \"summary\"")
            samples.append({"article": row["article"], "summary": summary})
            if max_samples is not None and len(samples) == max_samples:
                break
    if not samples:
        raise UserError(f"--data {path} has no samples")
    return samples


def prompt_ids(llm, article: str, style: str) -> list[int]:
    """Token ids of the prompt for one article (rank 0: it needs the tokenizer)."""
    if style == "auto":
        style = "chat" if getattr(llm.tokenizer, "chat_template", None) else "tldr"
    if style == "chat":
        return llm.encode(f"{INSTRUCTION}\n\n{article.strip()}", chat_template=True)
    return llm.encode(f"{article} TL;DR: ".strip().replace(" n't", "n't"), chat_template=False)


def rouge_scorer_module():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("tp-eval summarize needs rouge-score: pip install 'tp_runtime[eval]'") from None
    return rouge_scorer


def rouge(predictions: list[str], references: list[str]) -> dict:
    """Mean F-measure x100 of ROUGE-1, ROUGE-2 and ROUGE-L."""
    rouge_scorer = rouge_scorer_module()
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ROUGE_KEYS}
