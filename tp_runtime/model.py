"""The canonical decoder, one definition for every family, built from one rank's weights.

    x = embed(ids)
    per layer:  h = x + dense(attn(rope(qkv(norm1(x)))))          (pre-norm residual)
                x = h + proj(act(fc(norm2(h))) * gate(norm2(h)))   (gated MLP; fc and gate fused)
    logits = lm_head(ln_f(x))

Switches from the engine config (norm kind, biases, activation, rotary fraction and scaling,
per-layer sliding window) select the math; the model never asks which family it runs.
The KV cache is static: (max_batch, kv_heads_per_rank, max_seq, head_dim) per layer; batch row b
lives in cache slot b, and its tokens at positions 0..len_b-1.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime import engine_format as ef
from tp_runtime.comm import Communicator
from tp_runtime.engine_format import EngineConfig
from tp_runtime.layers import ColumnParallelLinear, Embedding, LayerNorm, ParallelLMHead, RMSNorm, RowParallelLinear

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rope_inv_freq(cfg: EngineConfig) -> torch.Tensor:
    rot_dim = int(cfg.head_size * cfg.rotary_pct)
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    scaling = cfg.rotary_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


def rope_tables(cfg: EngineConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(cfg)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (seq, rot_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (seq, rot_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim features, GPT-NeoX style (halves).

    x: (B, T, heads, D); cos/sin: (B, T, 1, rot_dim), rot_dim <= D."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot] if rot < x.shape[-1] else x
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    out = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, x[..., rot:]], dim=-1) if rot < x.shape[-1] else out


class KVCache:
    """Static per-layer key/value buffers for this rank's KV heads."""

    def __init__(self, cfg: EngineConfig, rank: int, max_batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (max_batch_size, cfg.kv_heads_per_rank[rank], max_seq_len, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len


class Attention(nn.Module):
    def __init__(self, cfg: EngineConfig, rank: int, w: dict, prefix: str, comm: Communicator):
        super().__init__()
        self.num_heads_per_rank = cfg.heads_per_rank[rank]
        self.num_kv_heads_per_rank = cfg.kv_heads_per_rank[rank]
        self.head_dim = cfg.head_size
        self.qkv = ColumnParallelLinear(w[f"{prefix}.qkv.weight"], w.get(f"{prefix}.qkv.bias"))
        self.dense = RowParallelLinear(w[f"{prefix}.dense.weight"], w.get(f"{prefix}.dense.bias"), comm)

    def forward(self, x, cos, sin, cache_k, cache_v, batch_idx, positions, mask):
        B, T, _ = x.shape
        hq, hkv, D = self.num_heads_per_rank, self.num_kv_heads_per_rank, self.head_dim
        qk, v = self.qkv(x).split([(hq + hkv) * D, hkv * D], dim=-1)
        qk = apply_rope(qk.view(B, T, hq + hkv, D), cos, sin)  # q and k heads rotated in one pass
        q = qk[:, :, :hq].transpose(1, 2)  # (B, heads_per_rank, T, D)
        cache_k[batch_idx, :, positions] = qk[:, :, hq:]  # slots (B, T) <- (B, T, kv_heads_per_rank, D)
        cache_v[batch_idx, :, positions] = v.view(B, T, hkv, D)
        S = mask.shape[-1]
        keys, values = cache_k[:B, :, :S], cache_v[:B, :, :S]  # (B, kv_heads_per_rank, S, D)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=hq != hkv)
        o = o.transpose(1, 2).reshape(B, T, hq * D)  # (B, T, heads_per_rank * D)
        return self.dense(o)


class GatedMLP(nn.Module):
    """proj(act(fc(x)) * gate(x)); fc and gate run as one fused column-parallel matmul."""

    def __init__(self, cfg: EngineConfig, w: dict, prefix: str, comm: Communicator):
        super().__init__()
        fc_b, gate_b = w.get(f"{prefix}.fc.bias"), w.get(f"{prefix}.gate.bias")
        fused_b = torch.cat([fc_b, gate_b]) if fc_b is not None else None
        self.fc_gate = ColumnParallelLinear(torch.cat([w[f"{prefix}.fc.weight"], w[f"{prefix}.gate.weight"]]), fused_b)
        self.proj = RowParallelLinear(w[f"{prefix}.proj.weight"], w.get(f"{prefix}.proj.bias"), comm)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        a, b = self.fc_gate(x).chunk(2, dim=-1)  # fused [fc_r; gate_r], each intermediate_per_rank wide
        return self.proj(self.act(a) * b)


class MLP(nn.Module):
    """proj(act(fc(x))) for families without a gate."""

    def __init__(self, cfg: EngineConfig, w: dict, prefix: str, comm: Communicator):
        super().__init__()
        self.fc = ColumnParallelLinear(w[f"{prefix}.fc.weight"], w.get(f"{prefix}.fc.bias"))
        self.proj = RowParallelLinear(w[f"{prefix}.proj.weight"], w.get(f"{prefix}.proj.bias"), comm)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


def make_norm(cfg: EngineConfig, w: dict, prefix: str):
    if cfg.norm_type == "layer":
        return LayerNorm(w[f"{prefix}.weight"], w.get(f"{prefix}.bias"), cfg.norm_epsilon)
    return RMSNorm(w[f"{prefix}.weight"], cfg.norm_epsilon)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: EngineConfig, rank: int, w: dict, i: int, comm: Communicator):
        super().__init__()
        p = ef.layer_prefix(i)
        self.input_layernorm = make_norm(cfg, w, f"{p}.input_layernorm")
        self.attention = Attention(cfg, rank, w, f"{p}.attention", comm)
        self.post_layernorm = make_norm(cfg, w, f"{p}.post_layernorm")
        self.mlp = (GatedMLP if cfg.gated_mlp else MLP)(cfg, w, f"{p}.mlp", comm)
        windows = cfg.sliding_window_per_layer
        self.window = windows[i] if windows else None

    def forward(self, x, cos, sin, cache_k, cache_v, batch_idx, positions, masks):
        h = x + self.attention(self.input_layernorm(x), cos, sin, cache_k, cache_v, batch_idx, positions,
                               masks[self.window])
        return h + self.mlp(self.post_layernorm(h))


class TPDecoder(nn.Module):
    """This rank's part of the canonical decoder."""

    def __init__(self, cfg: EngineConfig, rank: int, weights: dict, comm: Communicator, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(weights[ef.EMBEDDING])
        self.layers = nn.ModuleList(DecoderLayer(cfg, rank, weights, i, comm) for i in range(cfg.num_hidden_layers))
        self.ln_f = make_norm(cfg, weights, ef.FINAL_NORM)
        head = weights.get(ef.LM_HEAD)
        if head is None:  # tp=1 with tied embeddings: the head is the embedding itself
            head = self.embedding.weight.data
        self.lm_head = ParallelLMHead(head, cfg.vocab_size, comm)
        cos, sin = rope_tables(cfg, max_seq_len)
        dtype = self.embedding.weight.dtype
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        self.windows = sorted({layer.window for layer in self.layers}, key=lambda w: (w is not None, w or 0))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, last: torch.Tensor) -> torch.Tensor:
        """ids, positions: (B, T); rows are cache slots 0..B-1. last: (B,) index in T of the token
        whose next-token logits are wanted. Returns logits (B, vocab) on every rank."""
        B, T = ids.shape
        batch_idx = torch.arange(B, device=ids.device).unsqueeze(1).expand(B, T)  # (B, T) cache slot per token
        S = int(positions.max()) + 1
        kpos = torch.arange(S, device=ids.device).view(1, 1, 1, S)
        qpos = positions.view(B, 1, T, 1)
        causal = kpos <= qpos  # (B, 1, T, S)
        masks = {w: causal if w is None else causal & (kpos > qpos - w) for w in self.windows}
        cos = self.cos[positions].unsqueeze(2)  # (B, T, 1, rot_dim)
        sin = self.sin[positions].unsqueeze(2)
        x = self.embedding(ids)  # (B, T, hidden)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], batch_idx, positions, masks)
        x = x[torch.arange(B, device=ids.device), last]  # (B, hidden)
        return self.lm_head(self.ln_f(x))
