"""The paged KV cache: the block manager's accounting, attention through block tables, prefix reuse and
preemption, each against an answer computed without the feature (contiguous keys, a cold prefill, a solo run)."""

import random

import pytest
import torch

from helpers import build_checkpoint, random_prompts, reference_greedy, run_ranks, tp_run_json
from tp_runtime import LLM, SamplingParams
from tp_runtime.convert.pipeline import convert
from tp_runtime.errors import UserError
from tp_runtime.runtime.kv_cache import BlockManager

VOCAB = 97


# --- the block manager, alone ---

def test_blocks_never_leak_over_random_requests_aborts_and_preemptions():
    rng = random.Random(0)
    m = BlockManager(num_blocks=41, block_size=4)
    live = []
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    for step in range(1000):
        if live and rng.random() < 0.4:  # one ends: finished, aborted, disconnected or preempted, all alike
            seq, tokens = live.pop(rng.randrange(len(live)))
            m.release(seq)
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
            seq = m.admit(tokens)
            if seq is None:
                continue
            assert len(seq.table) == m.blocks_needed(len(tokens)) and seq.cached_tokens < len(tokens)
            m.register(seq, tokens)
            for _ in range(rng.randrange(0, 9)):  # decode steps: a block more whenever one fills
                if not m.grow(seq, len(tokens) + 1):
                    break
                tokens.append(rng.randrange(VOCAB))
                m.register(seq, tokens)
            live.append((seq, tokens))
        held = [b for s, _ in live for b in s.table]
        owned = {b for b in held if m.refs[b] > 0}
        assert 0 not in held  # block 0 is nobody's
        assert sum(m.refs) == len(held)  # every hold counted once, shared prefix blocks several times
        assert len(owned) + m.available == m.usable  # every block either held or available, none lost
    for seq, _ in live:
        m.release(seq)
    assert m.available == m.usable and sum(m.refs) == 0


def test_a_shared_prefix_takes_the_cached_blocks_and_eviction_is_least_recent_first():
    m = BlockManager(num_blocks=7, block_size=4)  # 6 usable blocks
    a = list(range(10))  # 2 full blocks + 2 tokens
    sa = m.admit(a)
    m.register(sa, a)
    sa_table = list(sa.table)
    b = a[:8] + [50, 51, 52]
    sb = m.admit(b)
    assert sb.table[:2] == sa.table[:2] and sb.cached_tokens == 8 and sb.table[2] not in sa.table
    whole = a[:8]  # the whole prompt cached: its last block is computed again, for its logits
    sw = m.admit(whole)
    assert sw.cached_tokens == 4 and sw.table[0] == sa.table[0] and sw.table[1] != sa.table[1]
    for s in (sa, sb, sw):
        m.release(s)
    assert m.available == 6
    # a's second block was released (by b) before its first (by the whole-prompt request): idle, oldest first
    assert list(m.idle) == [sa_table[1], sa_table[0]]
    c = m.admit(list(range(100, 116)))  # 4 blocks: the free ones (an admission never evicts while blocks are free)
    assert set(c.table).isdisjoint(sa_table[:2])
    m.release(c)  # unkeyed: back to the free list
    e = m.admit(list(range(200, 220)))  # 5 blocks: the 4 free ones, then the least recently released keyed one
    assert e is not None and sa_table[1] in e.table and sa_table[0] not in e.table
    again = m.admit(a)
    assert again is None  # 3 blocks needed, 1 left
    m.release(e)
    again = m.admit(a)
    assert again.cached_tokens == 4 and again.table[0] == sa_table[0]  # the first block survived, the second not
    m.release(again)
    assert m.available == 6 and sum(m.refs) == 0


def test_admission_waits_when_the_pool_is_short():
    m = BlockManager(num_blocks=5, block_size=4)  # 4 usable
    s1 = m.admit(list(range(12)))  # 3 blocks
    assert m.admit(list(range(100, 108))) is None and m.available == 1  # 2 needed: nothing taken
    assert m.admit([200, 201], reserve=1) is None  # 1 needed + 1 spare
    assert m.admit([200, 201]) is not None
    m.release(s1)


# --- attention through block tables ---

def test_paged_attention_equals_attention_over_contiguous_keys():
    from tp_runtime.runtime import native
    from tp_runtime.runtime.model import decode_attention, gather_blocks, native_decode_attention

    torch.manual_seed(0)
    B, H, Hkv, D, bs = 3, 6, 2, 16, 4
    pool_k, pool_v = torch.randn(20, Hkv, bs, D), torch.randn(20, Hkv, bs, D)
    tables = torch.tensor([[3, 7, 1, 9, 0], [5, 2, 0, 0, 0], [11, 12, 13, 14, 15]])  # rows' blocks, any order
    S, lengths = 19, [14, 6, 19]
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, ..., :n] = True
    q = torch.randn(B, H, 1, D)
    # contiguous keys built position by position, independently of gather_blocks
    keys, values = torch.zeros(B, Hkv, S, D), torch.zeros(B, Hkv, S, D)
    for b in range(B):
        for p in range(min(S, tables.shape[1] * bs)):
            keys[b, :, p], values[b, :, p] = pool_k[tables[b, p // bs], :, p % bs], pool_v[tables[b, p // bs], :, p % bs]
    want = decode_attention(q, keys, values, mask)
    assert torch.allclose(decode_attention(q, gather_blocks(pool_k, tables, S), gather_blocks(pool_v, tables, S),
                                           mask), want, atol=1e-6)
    if native.load():
        assert torch.allclose(native_decode_attention(q, pool_k, pool_v, tables, mask), want, atol=1e-5)


# --- the engine ---

@pytest.fixture(scope="module")
def model_and_engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    # a sliding window shorter than the prompts and GQA (3 KV heads: 2 + 1 at tp 2, one each at tp 3)
    model = build_checkpoint(str(root / "hf"), "mistral", seed=11, num_attention_heads=6, num_key_value_heads=3,
                             hidden_size=96, sliding_window=9, num_hidden_layers=2, vocab_size=VOCAB)
    for tp in (1, 2, 3):
        convert(str(root / "hf"), str(root / f"tp{tp}"), tp, progress=False)
    return model, root


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_paged_engine_matches_transformers_at_any_block_size(model_and_engines, block_size):
    model, root = model_and_engines
    prompts = random_prompts(VOCAB, seed=block_size, lengths=(3, 13, 8, 21))
    llm = LLM(str(root / "tp1"), compile="off", block_size=block_size, max_batch_size=3, max_seq_len=40)
    outs = llm.generate(prompts, SamplingParams(max_tokens=7, ignore_eos=True))
    llm.close()
    for p, o in zip(prompts, outs, strict=True):
        assert o.output_ids == reference_greedy(model, p, 7), (block_size, p)


def test_prefix_reuse_gives_the_cold_prefill_tokens_and_log_probs(model_and_engines):
    _, root = model_and_engines
    rng = random.Random(4)
    system = [rng.randrange(VOCAB) for _ in range(19)]  # 4 full blocks of 4 and 3 tokens
    second = [system + [rng.randrange(VOCAB) for _ in range(n)] for n in (2, 6, 1)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    cold = LLM(str(root / "tp1"), compile="off", block_size=4, max_batch_size=3, max_seq_len=40, prefix_cache=False)
    want = cold.generate(second, params)
    cold.close()
    warm = LLM(str(root / "tp1"), compile="off", block_size=4, max_batch_size=3, max_seq_len=40)
    first = warm.generate([system + [5]], params)[0]
    got = warm.generate(second, params)
    # the whole first conversation, prompt and answer, is a prefix of a second round
    round2 = system + [5] + first.output_ids + [7, 8]
    again = warm.generate([round2], params)[0]
    hit_rate = warm.blocks.hit_rate
    warm.close()
    cold = LLM(str(root / "tp1"), compile="off", block_size=4, max_batch_size=3, max_seq_len=40, prefix_cache=False)
    want_round2 = cold.generate([round2], params)[0]
    cold.close()
    assert hit_rate > 0.5
    for g, w in zip(got + [again], want + [want_round2], strict=True):
        assert g.output_ids == w.output_ids
        assert max(abs(a - b) for a, b in zip(g.output_logprobs, w.output_logprobs)) < 1e-4


def test_a_pool_smaller_than_the_batch_preempts_and_every_request_still_gets_its_solo_tokens(model_and_engines):
    model, root = model_and_engines
    prompts = random_prompts(VOCAB, seed=9, lengths=(5, 9, 3, 12, 7))
    # 11 blocks of 4 = 44 positions for 5 requests of up to 12 + 10 tokens: they cannot all run to the end at once
    per_block = 2 * 2 * 3 * 4 * 16 * 4  # (k, v) x layers x kv heads x block x head size x fp32
    llm = LLM(str(root / "tp1"), compile="off", block_size=4, max_batch_size=5, max_seq_len=24,
              kv_cache_memory=12 * per_block + 100)  # 11 + block 0
    assert llm.num_blocks == 12
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert llm.blocks.available == llm.blocks.usable  # nothing leaked
    assert llm.blocks.preemptions > 0
    llm.close()
    for p, o in zip(prompts, outs, strict=True):
        assert o.output_ids == reference_greedy(model, p, 10)


def test_a_budget_smaller_than_one_sequence_is_a_clear_error(model_and_engines):
    _, root = model_and_engines
    with pytest.raises(UserError, match="--kv_cache_memory .* one --max_seq_len 24 sequence needs"):
        LLM(str(root / "tp1"), compile="off", block_size=4, max_seq_len=24, kv_cache_memory=4096)


@pytest.mark.parametrize("tp", [2, 3])
def test_paged_engine_across_ranks_under_a_memory_budget(model_and_engines, tp):
    """tp 2 (KV heads split 2 + 1: the budget holds 20 blocks on rank 0, 40 on rank 1) and 3: the ranks agree on
    one block count (the smallest) and give transformers' tokens."""
    model, root = model_and_engines
    prompts = random_prompts(VOCAB, seed=tp, lengths=(6, 17, 2))
    extra = ["--input_ids", *(",".join(map(str, p)) for p in prompts), "--max_output_len", "6", "--ignore_eos",
             "--block_size", "4", "--kv_cache_memory", "40KiB", "--max_seq_len", "32", "--max_batch_size", "3",
             "--compile", "off"]
    out = tp_run_json(str(root / f"tp{tp}"), tp, extra)
    for p, o in zip(prompts, out["outputs"], strict=True):
        assert o["output_ids"] == reference_greedy(model, p, 6)


def test_a_prefill_in_chunks_gives_the_tokens_and_log_probs_of_one_prefill(model_and_engines):
    model, root = model_and_engines
    prompts = random_prompts(VOCAB, seed=21, lengths=(23, 4, 17))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    whole = LLM(str(root / "tp1"), compile="off", block_size=4, max_batch_size=3, max_seq_len=32)
    want = whole.generate(prompts, params)
    whole.close()
    chunked = LLM(str(root / "tp1"), compile="off", block_size=4, max_batch_size=3, max_seq_len=32, max_num_tokens=5)
    got = chunked.generate(prompts, params)
    chunked.close()
    for p, g, w in zip(prompts, got, want, strict=True):
        assert g.output_ids == w.output_ids == reference_greedy(model, p, 5)
        assert max(abs(a - b) for a, b in zip(g.output_logprobs, w.output_logprobs)) < 1e-4
