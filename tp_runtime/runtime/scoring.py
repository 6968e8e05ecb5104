"""Scoring: the log-probability of every token of given sequences, in lockstep on every rank.

    log p(ids[i] | ids[:i])  for i = start .. len-1,  an fp32 log-softmax of the logits at i - 1

One prefill per batch of sequences (right-padded like the decode loop's prefills: the causal mask keeps
the padding out of every real token's view), then the final norm and the LM head run row by row on
chunks of the positions that score a wanted token (a window's overlap with the previous one costs
no head work), so a window of T tokens never holds (T, vocab) logits at once: SmolLM2's vocab is 49152,
and 2048 positions of it in fp32 are 400 MB. Every rank runs the same forward (the head gathers its
logits to every rank); rank 0 alone takes the log-softmax and returns the scores.
"""

import torch

from tp_runtime.distributed.comm import Communicator
from tp_runtime.runtime.kv_cache import BlockManager, KVCache, Streaming
from tp_runtime.runtime.model import TPDecoder

LOGITS_CHUNK_BYTES = 64 << 20  # fp32 logits held at once per head call


def head_chunk(vocab: int) -> int:
    """Positions per LM-head call so that (chunk, vocab) fp32 logits stay near LOGITS_CHUNK_BYTES."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


@torch.inference_mode()
def score_batch(model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device,
                sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
    """Scores of one batch (len(sequences) <= the cache's batch size, every sequence within its
    length, 1 <= starts[b] < len(sequences[b])). Rank 0 returns, per sequence, the log-probs of
    tokens starts[b]..len-1; the other ranks return empty lists."""
    B = len(sequences)
    lens = [len(s) for s in sequences]
    T = max(lens)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, : lens[b]] = torch.tensor(s, dtype=torch.long)
    targets = ids  # the token each position predicts is ids[:, p + 1]
    ids = ids.to(device)
    positions = torch.arange(T, device=device).unsqueeze(0).expand(B, T)  # (B, T)
    hidden = model.hidden_states(ids, positions, cache)  # (B, T, hidden)

    lead = comm.rank == 0
    step = head_chunk(model.cfg.vocab_size)
    picked = torch.zeros(B, T, dtype=torch.float32)  # picked[b, i]: log p(ids[b, i] | ids[b, :i])
    for b in range(B):  # row by row: only the positions that score one of the row's tokens
        for p0 in range(starts[b] - 1, lens[b] - 1, step):
            p1 = min(p0 + step, lens[b] - 1)
            logits = model.logits(hidden[b, p0:p1])  # (p1 - p0, vocab) on every rank
            if lead:
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                picked[b, p0 + 1 : p1 + 1] = logp.gather(-1, targets[b, p0 + 1 : p1 + 1].unsqueeze(-1)).squeeze(-1)
    if not lead:
        return [[] for _ in sequences]
    return [picked[b, starts[b] : lens[b]].tolist() for b in range(B)]


@torch.inference_mode()
def score_streaming(model: TPDecoder, cache: KVCache, comm: Communicator, device: torch.device, ids: list[int],
                    streaming: Streaming) -> list[float]:
    """log p(ids[i] | what the cache holds) for i = 1 .. len-1, one token per decode step through StreamingLLM's
    cache (the sinks and the window, the window's keys moved back as it slides): a text of any length in
    bounded memory. Every rank runs the same steps with its own (identical) bookkeeping; rank 0 returns the
    scores, the others an empty list."""
    blocks = BlockManager(cache.num_blocks, cache.block_size, prefix_cache=False)
    bs = cache.block_size
    seq = blocks.admit(ids[:1])
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    last = torch.zeros(1, dtype=torch.long, device=device)
    out, dropped = [], 0
    for i in range(len(ids) - 1):
        moved = streaming.make_room(seq, i - dropped + 1, blocks)
        if moved:
            model.rerotate(cache, torch.tensor(moved, device=device), bs)
            dropped += bs
        pos = i - dropped
        if not blocks.grow(seq, pos + 1):
            raise RuntimeError("the KV cache cannot hold the streaming window")  # blocks_for sizes it to
        nb = max(2, blocks.blocks_needed(pos + 1))
        tables = torch.zeros(1, nb, dtype=torch.long)
        tables[0, : min(nb, len(seq.table))] = torch.tensor(seq.table[:nb])
        logits = model(tokens[i].view(1, 1), torch.tensor([[pos]], device=device), cache, last, tables.to(device))
        if comm.rank == 0:
            out.append(torch.log_softmax(logits[0].float(), dim=-1)[ids[i + 1]].item())
    blocks.release(seq)
    return out
