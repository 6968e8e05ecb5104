"""Partition rules as pure functions, in one process: shards reassemble the original."""

import pytest
import torch
import torch.nn.functional as F

from tp_runtime.convert import partition as pt
from tp_runtime.errors import UserError


def test_balanced_sizes():
    assert pt.balanced_sizes(10, 3) == [4, 3, 3]
    assert pt.balanced_sizes(1536, 2) == [768, 768]
    assert sum(pt.balanced_sizes(1537, 4)) == 1537


@pytest.mark.parametrize("heads,kv,tp,q_counts,kv_counts", [
    (9, 3, 2, [6, 3], [2, 1]),       # SmolLM2 at tp=2: uneven, 2 + 1 KV groups
    (9, 3, 3, [3, 3, 3], [1, 1, 1]),
    (8, 8, 3, [3, 3, 2], [3, 3, 2]),  # MHA, uneven heads
    (8, 2, 4, [2, 2, 2, 2], [1, 1, 1, 1]),  # KV replicated on 2 ranks each
    (32, 8, 8, [4] * 8, [1] * 8),
])
def test_head_splits(heads, kv, tp, q_counts, kv_counts):
    splits = pt.head_splits(heads, kv, tp)
    assert [s.num_heads_per_rank for s in splits] == q_counts
    assert [s.num_kv_heads_per_rank for s in splits] == kv_counts
    group = heads // kv
    for s in splits:  # every query head sits with its own KV head
        for h in range(*s.q_heads):
            assert s.kv_heads[0] <= h // group < s.kv_heads[1]
    # query heads are covered exactly once
    assert sorted(h for s in splits for h in range(*s.q_heads)) == list(range(heads))


def test_kv_replication_pairs_heads_with_their_group():
    splits = pt.head_splits(8, 2, 4)
    assert [s.kv_heads for s in splits] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_impossible_tp_lists_valid_sizes():
    with pytest.raises(UserError) as e:
        pt.head_splits(9, 3, 4, model="SmolLM2")
    msg = str(e.value)
    assert "SmolLM2" in msg and "tp_size=4" in msg and "valid tp sizes: 1, 2, 3, 9" in msg


def test_qkv_shards_reassemble_attention_projections():
    torch.manual_seed(0)
    heads, kv, D, hidden = 9, 3, 4, 12
    q, k, v = torch.randn(heads * D, hidden), torch.randn(kv * D, hidden), torch.randn(kv * D, hidden)
    for tp in (1, 2, 3):
        qs, ks, vs = [], [], []
        for s in pt.head_splits(heads, kv, tp):
            shard = pt.shard_qkv(q, k, v, s, D)
            nq, nk = s.num_heads_per_rank * D, s.num_kv_heads_per_rank * D
            assert shard.shape == (nq + 2 * nk, hidden)
            qs.append(shard[:nq]); ks.append(shard[nq:nq + nk]); vs.append(shard[nq + nk:])
        assert torch.equal(torch.cat(qs), q)
        assert torch.equal(torch.cat(ks), k) and torch.equal(torch.cat(vs), v)


def test_qkv_bias_shards_like_weights():
    heads, kv, D = 4, 2, 3
    q, k, v = torch.arange(12.0), torch.arange(100.0, 106.0), torch.arange(200.0, 206.0)
    s = pt.head_splits(heads, kv, 2)[1]
    assert pt.shard_qkv(q, k, v, s, D).tolist() == list(range(6, 12)) + [103.0, 104.0, 105.0, 203.0, 204.0, 205.0]


def test_row_parallel_partial_sums_with_bias_once():
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 10), torch.randn(7, 10), torch.randn(7)
    for tp in (1, 2, 3):
        spans = pt.ranges_from_sizes(pt.balanced_sizes(10, tp))
        partial = sum(F.linear(x[:, a:c], pt.shard_row(w, (a, c))) for a, c in spans)
        torch.testing.assert_close(partial + b, F.linear(x, w, b))  # the bias is added once, after the sum


def test_column_parallel_concatenates():
    torch.manual_seed(2)
    x, w = torch.randn(3, 5), torch.randn(11, 5)
    spans = pt.ranges_from_sizes(pt.balanced_sizes(11, 3))
    out = torch.cat([F.linear(x, pt.shard_column(w, s)) for s in spans], dim=-1)
    torch.testing.assert_close(out, F.linear(x, w))


def test_vocab_padding():
    w = torch.arange(10.0).view(5, 2)  # vocab 5
    assert pt.padded_vocab_size(5, 2) == 6 and pt.padded_vocab_size(5, 3) == 6 and pt.padded_vocab_size(6, 3) == 6
    shards = [pt.shard_vocab(w, r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [3, 3]
    full = torch.cat(shards)
    assert torch.equal(full[:5], w) and torch.equal(full[5:], torch.zeros(1, 2))
    shards = [pt.shard_vocab(w, r, 4) for r in range(4)]  # padded to 8: the last rank is all padding
    assert [s.shape[0] for s in shards] == [2, 2, 2, 2]
    assert torch.equal(torch.cat(shards)[:5], w) and not torch.cat(shards)[5:].any()


def test_rules_work_on_meta_tensors():
    q = torch.empty(36, 8, device="meta")
    kv = torch.empty(12, 8, device="meta")
    s = pt.head_splits(9, 3, 2)[0]
    assert pt.shard_qkv(q, kv, kv, s, 4).shape == (24 + 16, 8)
    assert pt.shard_vocab(torch.empty(5, 2, device="meta"), 1, 2).shape == (3, 2)
