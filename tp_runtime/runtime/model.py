"""The canonical decoder, one definition for every family, built from one rank's weights.

    x = embed(ids)
    per layer:  h = x + dense(attn(rope(qkv(norm1(x)))))          (pre-norm residual)
                x = h + proj(act(fc(norm2(h))) * gate(norm2(h)))   (gated MLP; fc and gate fused)
    logits = lm_head(ln_f(x))

Switches from the engine config (norm kind and placement, parallel residual, biases, QK-norm,
activation, gated or plain MLP, rotary fraction and scaling, per-layer sliding window and RoPE)
select the math; the model never asks which family it runs.
The KV cache is paged (runtime/kv_cache.py): per layer a pool (blocks, kv_heads_per_rank, block_size,
head_dim); batch row b's position p lives in row p % block_size of block tables[b, p // block_size].
"""


import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tp_runtime import memory
from tp_runtime.engine import format as ef
from tp_runtime.engine import functions
from tp_runtime.engine.functions import ACTIVATIONS, apply_rope
from tp_runtime.runtime import native, woq
from tp_runtime.distributed.comm import Communicator
from tp_runtime.engine.format import EngineConfig
from tp_runtime.runtime.kv_cache import KVCache
from tp_runtime.runtime.layers import (ColumnParallelLinear, Embedding, LayerNorm, ParallelLMHead, RMSNorm, RowParallelLinear,
                               VocabParallelEmbedding)

def rope_inv_freq(cfg: EngineConfig, seq_len: int | None = None) -> torch.Tensor:
    return functions.rope_inv_freq(cfg.head_size, cfg.rotary_pct, cfg.rotary_base, cfg.rotary_scaling,
                                   cfg.max_position_embeddings, seq_len)


def rope_tables(cfg: EngineConfig, max_seq_len: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(cfg, seq_len)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (seq, rot_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (seq, rot_dim)
    return angles.cos(), angles.sin()


def decode_attention(q, keys, values, mask):
    """Attention of one new token per row, as plain matmuls (cheaper than SDPA's kernels at T == 1).

    q: (B, heads, 1, D); keys, values: (B, kv_heads, S, D); mask: (B, 1, 1, S), True = visible."""
    B, H, _, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    q = q.reshape(B, Hkv, H // Hkv, D)  # (B, kv_heads, group, D): a group shares its KV head
    if torch.compiler.is_compiling():  # broadcast-multiply-sum: Inductor fuses each into one loop over the cache
        scores = (q.unsqueeze(3) * keys.unsqueeze(2)).sum(-1)  # (B, kv_heads, group, S)
    else:  # eagerly that would materialize (B, kv_heads, group, S, D): batched matmuls instead
        scores = q @ keys.transpose(-1, -2)  # (B, kv_heads, group, S)
    scores = (scores.float() * D ** -0.5).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    if torch.compiler.is_compiling():
        out = (probs.unsqueeze(-1) * values.unsqueeze(2)).sum(3)  # (B, kv_heads, group, D)
    else:
        out = probs @ values
    return out.reshape(B, H, 1, D)  # (B, heads, 1, D)


def native_decode_attention(q, cache_k, cache_v, tables, mask):
    """decode_attention through tp_woq::decode_attn (fp32 on CPU): one call per layer that reads each cached
    row once for the query heads of its KV head, straight from the pool through the block tables (the span
    is the mask's: no gathered copy of the keys and values).

    q: (B, heads, 1, D); cache_k, cache_v: (blocks, kv_heads, block_size, D); tables: (B, NB); mask: (B, 1, 1, S)."""
    B, H, _, D = q.shape
    Hkv, S = cache_k.shape[1], mask.shape[-1]
    out = torch.ops.tp_woq.decode_attn(q.reshape(B, Hkv, H // Hkv, D), cache_k, cache_v, tables, mask.reshape(B, S))
    return out.reshape(B, H, 1, D)


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor, S: int) -> torch.Tensor:
    """Positions 0..S-1 of each row, copied out of the pool: (blocks, kv_heads, bs, D) -> (B, kv_heads, S, D)."""
    B, nb = tables.shape
    _, Hkv, bs, D = pool.shape
    rows = pool[tables]  # (B, NB, kv_heads, bs, D)
    return rows.transpose(1, 2).reshape(B, Hkv, nb * bs, D)[:, :, :S]  # (B, kv_heads, S, D)


class Attention(nn.Module):
    native_decode = False  # decode steps through tp_woq::decode_attn (set by TPDecoder)

    def __init__(self, cfg: EngineConfig, rank: int, w: dict, prefix: str, comm: Communicator):
        super().__init__()
        self.num_heads_per_rank = cfg.heads_per_rank[rank]
        self.num_kv_heads_per_rank = cfg.kv_heads_per_rank[rank]
        self.head_dim = cfg.head_size
        self.qkv = ColumnParallelLinear(w.pop(f"{prefix}.qkv.weight"), w.pop(f"{prefix}.qkv.bias", None))
        self.dense = RowParallelLinear(w.pop(f"{prefix}.dense.weight"), w.pop(f"{prefix}.dense.bias", None), comm)
        self.qk_norm_weight = None
        if cfg.qk_norm:  # one (head_size,) weight for q heads, one for k heads: (heads + kv_heads, head_size)
            q_w, k_w = w.pop(f"{prefix}.q_layernorm.weight"), w.pop(f"{prefix}.k_layernorm.weight")
            both = torch.cat([q_w.expand(self.num_heads_per_rank, -1), k_w.expand(self.num_kv_heads_per_rank, -1)])
            self.qk_norm_weight = nn.Parameter(both.contiguous(), requires_grad=False)
            self.eps = cfg.norm_epsilon

    def forward(self, x, cos, sin, cache_k, cache_v, blocks, offsets, tables, mask):
        """cos/sin None: this layer has no RoPE. Token t of row b is written to row offsets[b, t] of block
        blocks[b, t]; the row attends to positions 0..S-1 (the mask's width) through tables[b]."""
        B, T, _ = x.shape
        hq, hkv, D = self.num_heads_per_rank, self.num_kv_heads_per_rank, self.head_dim
        qk, v = self.qkv(x).split([(hq + hkv) * D, hkv * D], dim=-1)
        qk = qk.view(B, T, hq + hkv, D)  # q and k heads side by side: normed and rotated in one pass
        if self.qk_norm_weight is not None:
            qk = F.rms_norm(qk.float(), (D,), None, self.eps).to(qk.dtype) * self.qk_norm_weight
        if cos is not None:
            qk = apply_rope(qk, cos, sin)
        q = qk[:, :, :hq].transpose(1, 2)  # (B, heads_per_rank, T, D)
        cache_k[blocks, :, offsets] = qk[:, :, hq:]  # (B, T) rows of blocks <- (B, T, kv_heads_per_rank, D)
        cache_v[blocks, :, offsets] = v.view(B, T, hkv, D)
        if T == 1 and self.native_decode:  # read straight from the pool through the tables
            o = native_decode_attention(q, cache_k, cache_v, tables, mask)
        else:
            S = mask.shape[-1]
            keys, values = gather_blocks(cache_k, tables, S), gather_blocks(cache_v, tables, S)  # (B, kv_heads, S, D)
            if T == 1:
                o = decode_attention(q, keys, values, mask)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=hq != hkv)
        o = o.transpose(1, 2).reshape(B, T, hq * D)  # (B, T, heads_per_rank * D)
        return self.dense(o)


class GatedMLP(nn.Module):
    """proj(act(fc(x)) * gate(x)); fc and gate run as one fused column-parallel matmul."""

    def __init__(self, cfg: EngineConfig, w: dict, prefix: str, comm: Communicator):
        super().__init__()
        fc_b, gate_b = w.pop(f"{prefix}.fc.bias", None), w.pop(f"{prefix}.gate.bias", None)
        fused_b = torch.cat([fc_b, gate_b]) if fc_b is not None else None
        fused = woq.cat_out([w.pop(f"{prefix}.fc.weight"), w.pop(f"{prefix}.gate.weight")])
        self.fc_gate = ColumnParallelLinear(fused, fused_b)
        self.proj = RowParallelLinear(w.pop(f"{prefix}.proj.weight"), w.pop(f"{prefix}.proj.bias", None), comm)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        a, b = self.fc_gate(x).chunk(2, dim=-1)  # fused [fc_r; gate_r], each intermediate_per_rank wide
        return self.proj(self.act(a) * b)


class MLP(nn.Module):
    """proj(act(fc(x))) for families without a gate."""

    def __init__(self, cfg: EngineConfig, w: dict, prefix: str, comm: Communicator):
        super().__init__()
        self.fc = ColumnParallelLinear(w.pop(f"{prefix}.fc.weight"), w.pop(f"{prefix}.fc.bias", None))
        self.proj = RowParallelLinear(w.pop(f"{prefix}.proj.weight"), w.pop(f"{prefix}.proj.bias", None), comm)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


def make_norm(cfg: EngineConfig, w: dict, prefix: str):
    if cfg.norm_type == "layer":
        return LayerNorm(w.pop(f"{prefix}.weight"), w.pop(f"{prefix}.bias", None), cfg.norm_epsilon)
    return RMSNorm(w.pop(f"{prefix}.weight"), cfg.norm_epsilon)


class DecoderLayer(nn.Module):
    """One block; the residual layout comes from the config (pre-norm, post-norm, parallel)."""

    def __init__(self, cfg: EngineConfig, rank: int, w: dict, i: int, comm: Communicator):
        super().__init__()
        p = ef.layer_prefix(i)
        self.placement, self.parallel = cfg.norm_placement, cfg.parallel_residual
        first, second = (("post_attention_layernorm", "post_feedforward_layernorm") if self.placement == "post"
                         else ("input_layernorm", "post_layernorm"))
        self.norm1 = make_norm(cfg, w, f"{p}.{first}")
        self.norm2 = make_norm(cfg, w, f"{p}.{second}")
        self.attention = Attention(cfg, rank, w, f"{p}.attention", comm)
        self.mlp = (GatedMLP if cfg.gated_mlp else MLP)(cfg, w, f"{p}.mlp", comm)
        windows = cfg.sliding_window_per_layer
        self.window = windows[i] if windows else None
        self.rope = cfg.rope_per_layer[i] if cfg.rope_per_layer else True

    def forward(self, x, cos, sin, cache_k, cache_v, blocks, offsets, tables, masks):
        rope = (cos, sin) if self.rope else (None, None)
        args = (*rope, cache_k, cache_v, blocks, offsets, tables, masks[self.window])
        if self.placement == "post":
            h = x + self.norm1(self.attention(x, *args))
            return h + self.norm2(self.mlp(h))
        if self.parallel:
            return x + self.attention(self.norm1(x), *args) + self.mlp(self.norm2(x))
        h = x + self.attention(self.norm1(x), *args)
        return h + self.mlp(self.norm2(h))

    # The two halves of forward, apart, so a checker can feed each its own input (tp-verify): forward's
    # output is mlp_half(x, attention_half(x, ...)). A parallel residual's h is x + attention alone.

    def attention_half(self, x, cos, sin, cache_k, cache_v, blocks, offsets, tables, masks):
        """x (B, T, hidden) -> h, the hidden state after the attention half of the block."""
        rope = (cos, sin) if self.rope else (None, None)
        args = (*rope, cache_k, cache_v, blocks, offsets, tables, masks[self.window])
        if self.placement == "post":
            return x + self.norm1(self.attention(x, *args))
        return x + self.attention(self.norm1(x), *args)

    def mlp_half(self, x, h):
        """The layer's output from h (attention_half's); x, the layer's input, feeds a parallel residual's MLP."""
        if self.placement == "post":
            return h + self.norm2(self.mlp(h))
        return h + self.mlp(self.norm2(x if self.parallel else h))


class TPDecoder(nn.Module):
    """This rank's part of the canonical decoder. Takes its tensors out of `weights` as it builds,
    so each source tensor is freed once its layer holds its own (transposed / fused) copy."""

    def __init__(self, cfg: EngineConfig, rank: int, weights: dict, comm: Communicator, max_seq_len: int,
                 woq_kernel: str = "auto", native_attention: bool = True, progress: bool = False):
        super().__init__()
        self.cfg = cfg
        emb = weights.pop(ef.EMBEDDING)
        self.embedding = VocabParallelEmbedding(emb, rank, comm) if cfg.use_parallel_embedding else Embedding(emb)
        self.layers = nn.ModuleList()
        for i in tqdm(range(cfg.num_hidden_layers), desc="loading", unit="layer", disable=not progress, leave=False):
            # Weight-only quantized linears become QuantWeights one layer at a time: their unpacked codes live
            # until the layer's kernels hold their own layout, so one layer's are alive at once, not the model's.
            woq.collect(weights, emb.dtype, woq_kernel, prefix=ef.layer_prefix(i) + ".", quantization=cfg.quantization)
            self.layers.append(DecoderLayer(cfg, rank, weights, i, comm))
            memory.trim_heap()  # the layer's freed buffers back to the system, not kept for the next layers' holes
        woq.collect(weights, emb.dtype, woq_kernel, quantization=cfg.quantization)  # a quantized lm_head
        self.ln_f = make_norm(cfg, weights, ef.FINAL_NORM)
        head = weights.pop(ef.LM_HEAD, None)
        if head is None:  # tied, and sharded like the embedding: the head is the embedding itself
            head = self.embedding.weight.data
        self.lm_head = ParallelLMHead(head, cfg.vocab_size, comm)
        if weights:
            raise ValueError(f"rank {rank}'s file holds tensors the canonical decoder does not use: "
                             f"{sorted(weights)[:5]}; the engine and this tp_runtime disagree")
        cos, sin = rope_tables(cfg, max_seq_len)
        dtype = self.embedding.weight.dtype
        native_attention = (emb.device.type == "cpu" and dtype == torch.float32 and cfg.head_size % 8 == 0
                            and native_attention and native.load())
        for layer in self.layers:
            layer.attention.native_decode = native_attention
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        self.windows = sorted({layer.window for layer in self.layers}, key=lambda w: (w is not None, w or 0))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, last: torch.Tensor | None = None,
                tables: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions: (B, T). last: (B,) index in T of the token whose next-token logits are
        wanted (None: every position's). tables: (B, NB) each row's block table, covering its positions
        (None: rows 0..B-1 get blocks of their own, for a caller that owns the whole cache).
        Returns logits (B, vocab), or (B, T, vocab) when last is None, on every rank.

        A step is split in two: what depends on Python values (the attention span, the masks, RoPE
        rows) runs eagerly in `_prepare`; the rest is a pure function of tensors, run eagerly or, for
        decode steps (T == 1) once runtime/compile.py's compile_decode has set `compiled_step`, compiled."""
        B, T = ids.shape
        if tables is None:
            tables = cache.dense_tables(B, int(positions.max()) + 1, ids.device)
        if T == 1 and last is not None and self.compiled_step is not None:
            return self.compiled_step(*self._decode_args(ids, positions, cache, last, tables))
        x = self.hidden_states(ids, positions, cache, tables)  # (B, T, hidden)
        if last is not None:
            x = x[torch.arange(B, device=ids.device), last]  # (B, hidden)
        return self.logits(x)

    def _decode_args(self, ids, positions, cache, last, tables) -> tuple:
        """The compiled decode body's arguments for a step."""
        return (ids, *self._prepare(ids, positions, tables, cache.block_size), tables, cache.k, cache.v, last)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head of hidden states (..., hidden) -> (..., vocab), gathered to every rank."""
        return self.lm_head(self.ln_f(x))

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                      tables: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder body, before the final norm: (B, T, hidden). Writes the rows' keys and values
        into the cache like forward; a scorer calls it, then `logits` on chunks of positions."""
        B, T = ids.shape
        if tables is None:
            tables = cache.dense_tables(B, int(positions.max()) + 1, ids.device)
        return self._layers(ids, *self._prepare(ids, positions, tables, cache.block_size), tables, cache.k, cache.v)

    def layer_inputs(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> tuple:
        """(blocks, offsets, tables, masks, cos, sin) of a step whose rows own the cache, for calling layers one
        at a time (tp-verify): layer(x, cos, sin, cache.k[i], cache.v[i], blocks, offsets, tables, masks)."""
        tables = cache.dense_tables(ids.shape[0], int(positions.max()) + 1, ids.device)
        blocks, offsets, masks, cos, sin = self._prepare(ids, positions, tables, cache.block_size)
        return blocks, offsets, tables, masks, cos, sin

    def _prepare(self, ids, positions, tables, bs):
        """(blocks, offsets, masks, cos, sin) of a step: where every token's keys and values go (the block and
        its row), the attention masks per sliding window, and the RoPE rows of the positions."""
        B, T = ids.shape
        nb = tables.shape[1]
        index = torch.clamp(positions // bs, max=nb - 1)  # (B, T); a padding token past the table -> its end
        blocks = torch.where(positions // bs < nb, tables.gather(1, index), 0)  # (B, T) block 0 takes the rest
        offsets = positions % bs  # (B, T)
        S = int(positions.max()) + 1
        kpos = torch.arange(S, device=ids.device).view(1, 1, 1, S)
        qpos = positions.view(B, 1, T, 1)
        causal = kpos <= qpos  # (B, 1, T, S)
        masks = {w: causal if w is None else causal & (kpos > qpos - w) for w in self.windows}
        cos_table, sin_table = self.cos, self.sin
        if (self.cfg.rotary_scaling or {}).get("rope_type") == "dynamic" and S > self.cfg.max_position_embeddings:
            cos_table, sin_table = (t.to(self.cos.dtype) for t in rope_tables(self.cfg, self.cos.shape[0], S))
        cos = cos_table[positions].unsqueeze(2)  # (B, T, 1, rot_dim)
        sin = sin_table[positions].unsqueeze(2)
        return blocks, offsets, masks, cos, sin

    def _layers(self, ids, blocks, offsets, masks, cos, sin, tables, cache_k, cache_v):
        x = self.embedding(ids)  # (B, T, hidden)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache_k[i], cache_v[i], blocks, offsets, tables, masks)
        return x

    def _decode_body(self, ids, blocks, offsets, masks, cos, sin, tables, cache_k, cache_v, last):
        x = self._layers(ids, blocks, offsets, masks, cos, sin, tables, cache_k, cache_v)
        x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, hidden)
        return self.logits(x)

    @torch.inference_mode()
    def rerotate(self, cache: KVCache, blocks: torch.Tensor, delta: int) -> None:
        """Move the cached keys of `blocks` delta positions back (StreamingLLM's window sliding toward the sinks):
        keys are cached after RoPE, and rotations compose, R(p - delta) = R(-delta) R(p). Layers without RoPE keep
        their keys; values never carry a position."""
        angles = -delta * rope_inv_freq(self.cfg).to(blocks.device)  # (rot_dim / 2,)
        angles = torch.cat([angles, angles])  # (rot_dim,)
        cos, sin = angles.cos(), angles.sin()
        for layer, pool in zip(self.layers, cache.k):
            if layer.rope:
                keys = pool[blocks]  # (n, kv_heads, bs, D)
                pool[blocks] = apply_rope(keys.float(), cos, sin).to(pool.dtype)

    compiled_step = None  # runtime/compile.py's CompiledDecode, once compile_decode has run
