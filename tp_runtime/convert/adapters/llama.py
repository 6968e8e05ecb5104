"""LlamaForCausalLM (SmolLM2 included), MistralForCausalLM (sliding window), Qwen2ForCausalLM (qkv bias)."""

from tp_runtime.convert.adapters.base import DecoderAdapter, fetch, fetch_qkv


class LlamaAdapter(DecoderAdapter):
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    model_types = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

    def config(self) -> dict:
        attention_bias = bool(self.hf.get("attention_bias", False))
        cfg = self.dims()
        return dict(
            cfg,
            architecture="LlamaForCausalLM",
            qkv_bias=attention_bias or self.arch == "Qwen2ForCausalLM",
            dense_bias=attention_bias,
            mlp_bias=bool(self.hf.get("mlp_bias", False)),
            sliding_window_per_layer=self._sliding_windows(cfg["num_hidden_layers"]),
        )

    def _sliding_windows(self, layers: int) -> list | None:
        hf = self.hf
        window = hf.get("sliding_window")
        if not window:
            return None
        types = hf.get("layer_types")
        if isinstance(types, list) and len(types) == layers:
            out = [int(window) if t == "sliding_attention" else None for t in types]
        elif self.arch == "Qwen2ForCausalLM":
            if not hf.get("use_sliding_window", False):
                return None
            first = int(hf.get("max_window_layers", layers))
            out = [int(window) if i >= first else None for i in range(layers)]
        else:
            out = [int(window)] * layers
        return out if any(w is not None for w in out) else None

    def embedding(self):
        return fetch(self.ckpt, "model.embed_tokens.weight")

    def layer(self, i: int, cfg: dict) -> dict:
        ck, src = self.ckpt, f"model.layers.{i}"
        attn = f"{src}.self_attn"
        out = {
            "input_layernorm.weight": fetch(ck, f"{src}.input_layernorm.weight"),
            "attention.qkv.weight": fetch_qkv(ck, *(f"{attn}.{p}_proj.weight" for p in "qkv")),
            "attention.dense.weight": fetch(ck, f"{attn}.o_proj.weight"),
            "post_layernorm.weight": fetch(ck, f"{src}.post_attention_layernorm.weight"),
            "mlp.fc.weight": fetch(ck, f"{src}.mlp.gate_proj.weight"),
            "mlp.gate.weight": fetch(ck, f"{src}.mlp.up_proj.weight"),
            "mlp.proj.weight": fetch(ck, f"{src}.mlp.down_proj.weight"),
        }
        if cfg["qkv_bias"]:
            out["attention.qkv.bias"] = fetch_qkv(ck, *(f"{attn}.{p}_proj.bias" for p in "qkv"))
        if cfg["dense_bias"]:
            out["attention.dense.bias"] = fetch(ck, f"{attn}.o_proj.bias")
        if cfg["mlp_bias"]:
            out["mlp.fc.bias"] = fetch(ck, f"{src}.mlp.gate_proj.bias")
            out["mlp.gate.bias"] = fetch(ck, f"{src}.mlp.up_proj.bias")
            out["mlp.proj.bias"] = fetch(ck, f"{src}.mlp.down_proj.bias")
        return out

    def final_norm(self) -> dict:
        return {"weight": fetch(self.ckpt, "model.norm.weight")}

    def lm_head(self, cfg: dict):
        tied = cfg["tie_word_embeddings"] or "lm_head.weight" not in self.ckpt
        return fetch(self.ckpt, "model.embed_tokens.weight" if tied else "lm_head.weight")
