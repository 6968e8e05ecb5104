"""GPT-NeoX (GPTNeoXForCausalLM; GPT-NeoX-20B, Pythia).

    gpt_neox.embed_in, gpt_neox.layers.{i}.input_layernorm / .post_attention_layernorm (LayerNorm
    with bias), .attention.query_key_value (+bias), .attention.dense (+bias), .mlp.dense_h_to_4h /
    .dense_4h_to_h (+biases, plain gelu MLP), gpt_neox.final_layer_norm, embed_out (untied)
`query_key_value` interleaves per head: rows of head h are [q_h; k_h; v_h], head_dim each. RoPE covers
the first rotary_pct of each head; with use_parallel_residual, x + attn(ln1(x)) + mlp(ln2(x)).
"""

from tp_runtime.convert.adapters.base import DecoderAdapter, fetch


def split_interleaved_qkv(w, num_heads: int, head_dim: int):
    """(heads * 3 * head_dim, ...) with [q_h; k_h; v_h] per head -> q, k, v (heads * head_dim, ...)."""
    rest = tuple(w.shape[1:])
    per_head = w.reshape(num_heads, 3, head_dim, *rest)  # (heads, 3, head_dim, ...)
    return tuple(per_head[:, j].reshape(num_heads * head_dim, *rest) for j in range(3))


class GPTNeoXAdapter(DecoderAdapter):
    architectures = ("GPTNeoXForCausalLM",)
    model_types = {"gpt_neox": "GPTNeoXForCausalLM"}

    def config(self) -> dict:
        cfg = self.dims(act_default="gelu", eps="layer_norm_eps", eps_default=1e-5, max_positions=2048,
                        theta_key="rotary_emb_base")
        params = self.hf.get("rope_parameters") or {}
        pct = params.get("partial_rotary_factor", self.hf.get("rotary_pct", 0.25))
        bias = bool(self.hf.get("attention_bias", True))
        return dict(
            cfg,
            architecture="GPTNeoXForCausalLM",
            rotary_pct=float(pct),
            norm_type="layer",
            parallel_residual=bool(self.hf.get("use_parallel_residual", True)),
            gated_mlp=False,
            qkv_bias=bias,
            dense_bias=bias,
            mlp_bias=True,
        )

    def _qkv(self, name: str, cfg: dict):
        src = fetch(self.ckpt, name)
        return lambda meta: split_interleaved_qkv(src(meta), cfg["num_attention_heads"], cfg["head_size"])

    def embedding(self):
        return fetch(self.ckpt, "gpt_neox.embed_in.weight")

    def layer(self, i: int, cfg: dict) -> dict:
        ck, src = self.ckpt, f"gpt_neox.layers.{i}"
        out = {
            "input_layernorm.weight": fetch(ck, f"{src}.input_layernorm.weight"),
            "input_layernorm.bias": fetch(ck, f"{src}.input_layernorm.bias"),
            "attention.qkv.weight": self._qkv(f"{src}.attention.query_key_value.weight", cfg),
            "attention.dense.weight": fetch(ck, f"{src}.attention.dense.weight"),
            "post_layernorm.weight": fetch(ck, f"{src}.post_attention_layernorm.weight"),
            "post_layernorm.bias": fetch(ck, f"{src}.post_attention_layernorm.bias"),
            "mlp.fc.weight": fetch(ck, f"{src}.mlp.dense_h_to_4h.weight"),
            "mlp.fc.bias": fetch(ck, f"{src}.mlp.dense_h_to_4h.bias"),
            "mlp.proj.weight": fetch(ck, f"{src}.mlp.dense_4h_to_h.weight"),
            "mlp.proj.bias": fetch(ck, f"{src}.mlp.dense_4h_to_h.bias"),
        }
        if cfg["qkv_bias"]:
            out["attention.qkv.bias"] = self._qkv(f"{src}.attention.query_key_value.bias", cfg)
            out["attention.dense.bias"] = fetch(ck, f"{src}.attention.dense.bias")
        return out

    def final_norm(self) -> dict:
        return {"weight": fetch(self.ckpt, "gpt_neox.final_layer_norm.weight"),
                "bias": fetch(self.ckpt, "gpt_neox.final_layer_norm.bias")}

    def lm_head(self, cfg: dict):
        tied = cfg["tie_word_embeddings"] or "embed_out.weight" not in self.ckpt
        return fetch(self.ckpt, "gpt_neox.embed_in.weight" if tied else "embed_out.weight")
