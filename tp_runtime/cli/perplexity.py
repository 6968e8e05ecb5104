"""Sliding-window perplexity of an engine, as in Hugging Face's "Perplexity of fixed-length models".

    windows of W tokens start every S tokens (S <= W); each window scores only the tokens that the
    previous window did not, so every token from the second on is scored exactly once, with at least
    W - S tokens of context (the first window's tokens with what precedes them):

        tokens   0 ........................................ N-1
        window 1 [0, W)           scores 1 .. W-1
        window 2     [S, S+W)     scores W .. S+W-1          (context: S .. W-1)
        window 3         [2S, 2S+W)  scores S+W .. 2S+W-1    ...

    perplexity = exp(sum of -log p(token | its window's earlier tokens) / tokens scored)

With S = W the windows do not overlap and each window's first token goes unscored (nothing in its
window precedes it), as in the guide. Default text: CPython's own reference documentation,
`pydoc_data.topics` (every Python installation ships it, no download): its topics in sorted key order,
each followed by a blank line, cut to the first --max_tokens tokens. The topics change between Python
versions, so the output names the version; compare perplexities only on the same text.
"""

import math
import os
import sys

from tp_runtime.errors import UserError


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, start) per window: tokens [begin, end) are fed, tokens begin+start .. end-1 scored."""
    if n_tokens < 2:
        raise UserError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    if window < 2:
        raise UserError(f"--window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise UserError(f"--stride must be in [1, --window={window}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(prev_end - begin, 1)))
        prev_end = end
        if end == n_tokens:
            break
    return [w for w in out if w[2] < w[1] - w[0]]  # a window with nothing left to score is dropped


def default_text() -> tuple[str, str]:
    """(text, description) of the default corpus."""
    from pydoc_data.topics import topics

    v = sys.version_info
    text = "".join(topics[k].strip() + "\n\n" for k in sorted(topics))
    return text, f"pydoc_data.topics of Python {v.major}.{v.minor}.{v.micro} (sorted topics)"


def read_text(path: str | None) -> tuple[str, str]:
    """(text, description): the file given, or the default corpus."""
    if path is None:
        return default_text()
    if not os.path.isfile(path):
        raise UserError(f"--text_file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"--text_file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"--text_file {path} is empty")
    return text, path


def tokenize(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """The text's token ids as the tokenizer gives them by default (its BOS, if it adds one), cut to max_tokens."""
    ids = list(tokenizer(text, verbose=False)["input_ids"])  # no warning about the model's length: windows cut it
    return ids[:max_tokens] if max_tokens else ids


def window_jobs(ids: list[int], windows) -> tuple[list[list[int]], list[int]]:
    return [ids[b:e] for b, e, _ in windows], [s for _, _, s in windows]


def engine_nll(llm, ids: list[int], windows, progress: bool = False) -> tuple[float, int]:
    """(sum of negative log-likelihoods, tokens scored) of the windows under the engine; every rank
    calls it with the same arguments and gets the same answer."""
    from tqdm import tqdm

    seqs, starts = window_jobs(ids, windows)
    total, count, B = 0.0, 0, llm.max_batch_size
    for i in tqdm(range(0, len(seqs), B), desc="perplexity", unit="batch", disable=not progress, leave=False):
        for lps in llm.score(seqs[i : i + B], starts[i : i + B]):
            total -= math.fsum(lps)
            count += len(lps)
    return total, count
