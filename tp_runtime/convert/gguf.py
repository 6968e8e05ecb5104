"""GGUF files (llama.cpp's format) read one tensor at a time, their quantized blocks kept where the engine
holds them as they are.

A GGUF file is a header (metadata, then each tensor's name, type, shape and offset) and the tensors' data.
GGUF lists a weight's shape input-first (ne = [in, out]); its data is `out` rows, each row the blocks of
its inputs in order. The legacy block types hold 32 weights a block, with a float16 step d (and m):

    Q8_0  34 bytes: d, 32 int8 q                   w = d * q
    Q4_0  18 bytes: d, 16 bytes of 4-bit codes     w = d * (q - 8)
    Q4_1  20 bytes: d, m, 16 bytes of 4-bit codes  w = d * q + m
          (byte j holds weight j in its low nibble and weight 16 + j in its high one)

These become the engine's weight-only formats without rounding anything again (quantize.py):

    Q8_0 -> int8, a scale per 32 inputs        Q4_0 -> int4 g32, zero 8        Q4_1 -> int4 g32, minimum m

Everything else (k-quants such as Q4_K / Q6_K, i-quants, F16...) is dequantized with the gguf package and,
when the engine is quantized, rounded again: to int4 g32 with zero points for types of 4 bits or fewer,
to int8 g32 otherwise, with one warning line per type. The linears fused at run time (q, k, v; gate and
up) must share a format: a set that mixes int8 and int4 blocks is rounded to int8 g32 whole.

Names follow transformers' GGUF loader: the Hugging Face model is built on the meta device from the
config transformers reads from the header, and each of its tensor names goes through gguf's
TensorNameMap to the GGUF name (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight). llama.cpp
stores a Llama-architecture q and k with the rows of each head reordered for its RoPE (the two halves
interleaved); reading undoes that, as transformers does. It moves whole output rows, so the blocks (along
the inputs) stay intact: the rows of bytes are permuted before they are decoded.

Each tensor is read with plain file reads into its own buffer (as checkpoint.py reads safetensors), so
memory holds one tensor at a time; the header is parsed by gguf's GGUFReader.
"""

import os
import sys

import numpy as np
import torch

from tp_runtime.convert import quantize as qz
from tp_runtime.errors import UserError

BLOCK = 32
# GGUF architectures read here (the families of the Llama adapter); others go through transformers whole.
ARCHITECTURES = ("llama", "mistral", "qwen2")
KEPT = {"Q8_0": ("int8", BLOCK), "Q4_0": ("int4", BLOCK), "Q4_1": ("int4", BLOCK)}
# Linears fused at run time, by the last two parts of their Hugging Face name: they must share a format.
SETS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
        ("self_attn.o_proj",), ("mlp.down_proj",))
LINEARS = tuple(n for group in SETS for n in group)


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise UserError(f"reading .gguf needs the gguf package (pip install 'tp_runtime[gguf]'; {e})") from None
    return gguf


class GgufFile:
    """The header of one .gguf file, and each tensor read on demand under its Hugging Face name."""

    def __init__(self, path: str, config: dict):
        gguf = _gguf()
        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as e:
            raise UserError(f"{path} is not a readable GGUF file ({e})") from None
        field = self.reader.get_field("general.architecture")
        self.arch = field.contents() if field is not None else None
        self.infos = {t.name: t for t in self.reader.tensors}
        self.config = config
        self.names = self._name_map(gguf)  # Hugging Face name -> GGUF name, for the tensors the file has

    def _name_map(self, gguf) -> dict:
        from transformers import AutoConfig, AutoModelForCausalLM

        arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch), None)
        if arch is None:
            raise UserError(f"{self.path}: GGUF architecture {self.arch!r} is unknown to the gguf package")
        name_map = gguf.get_tensor_name_map(arch, int(self.config["num_hidden_layers"]))
        hf_config = AutoConfig.for_model(**self.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        names = {}
        for hf_name in model.state_dict():
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = name_map.get_name(base)
            if gguf_name is not None and f"{gguf_name}.{suffix}" in self.infos:
                names[hf_name] = f"{gguf_name}.{suffix}"
        return names

    # --- one tensor ---

    def type_name(self, hf_name: str) -> str:
        return self.infos[self.names[hf_name]].tensor_type.name

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.infos[self.names[hf_name]].shape))  # (out, in)

    def dtype(self, hf_name: str) -> torch.dtype:
        return torch.float32  # as load() gives it

    def raw(self, hf_name: str) -> np.ndarray:
        """The tensor's bytes as (out, bytes per row) uint8, or (n,) for a vector, rows in Hugging Face order."""
        info = self.infos[self.names[hf_name]]
        buf = np.empty(int(info.n_bytes), dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(int(info.data_offset))
            if f.readinto(memoryview(buf)) != buf.size:
                raise UserError(f"{self.path} is truncated while reading {info.name}")
        shape = self.shape(hf_name)
        rows = buf.reshape(shape[0], -1) if len(shape) == 2 else buf
        return rows[self._row_order(hf_name, shape[0])] if self._permuted(hf_name) else rows

    def _permuted(self, hf_name: str) -> bool:
        return self.arch == "llama" and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name)

    def _row_order(self, hf_name: str, rows: int) -> np.ndarray:
        """Hugging Face row r is GGUF row order[r]: per head, llama.cpp put row 2j + h of (dim / 2, 2) at
        h * dim / 2 + j; transformers' reverse_permute takes it back."""
        heads = int(self.config["num_attention_heads"])
        if ".k_proj." in hf_name:
            heads = int(self.config.get("num_key_value_heads") or heads)
        order = np.arange(rows).reshape(heads, rows // heads // 2, 2)  # (heads, dim / 2, 2)
        return order.swapaxes(1, 2).reshape(rows)

    def load(self, hf_name: str) -> torch.Tensor:
        """float32, dequantized by the gguf package whatever the type."""
        info = self.infos[self.names[hf_name]]
        raw = self.raw(hf_name)
        gguf = _gguf()
        kind = info.tensor_type
        if kind == gguf.GGMLQuantizationType.F32:
            values = raw.view(np.float32)
        elif kind == gguf.GGMLQuantizationType.F16:
            values = raw.view(np.float16).astype(np.float32)
        else:
            values = gguf.quants.dequantize(raw, kind)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape(hf_name))

    def blocks(self, hf_name: str) -> qz.QuantizedWeight:
        """A Q8_0 / Q4_0 / Q4_1 weight as engine codes and scales, exactly (no arithmetic on the values)."""
        kind = self.type_name(hf_name)
        out_f, in_f = self.shape(hf_name)
        raw = self.raw(hf_name)
        size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
        blocks = raw.reshape(out_f, in_f // BLOCK, size)  # (out, groups, block bytes)
        d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32))
        if kind == "Q8_0":
            q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)).reshape(out_f, in_f)
            return qz.QuantizedWeight(q, d, None, None, "int8", grouped=True)
        minimum = None
        if kind == "Q4_1":
            minimum = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
                                       .astype(np.float32))
        nibbles = torch.from_numpy(np.ascontiguousarray(blocks[..., size - 16:]))  # (out, groups, 16)
        q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(out_f, in_f)  # weights 0-15, then 16-31
        return qz.QuantizedWeight(q, d, None, None, "int4", minimum)


def open_gguf(path: str) -> tuple[GgufFile, dict | None] | None:
    """(the file, its generation config) for checkpoint.py to serve as a checkpoint of float32 tensors, or
    None when its architecture is not one read tensor by tensor here."""
    from transformers import AutoConfig, GenerationConfig

    folder, name = os.path.split(os.path.abspath(path))
    gguf = _gguf()
    try:
        arch_field = gguf.GGUFReader(path).get_field("general.architecture")
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})") from None
    if arch_field is None or arch_field.contents() not in ARCHITECTURES:
        return None
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    try:
        gen = GenerationConfig.from_model_config(config).to_dict()
    except Exception:
        gen = None
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    return GgufFile(path, cfg), gen


# ---------------------------------------------------------------------------
# the linears' formats: kept blocks, or rounded again


def _bits_at_most_4(type_name: str) -> bool:
    return type_name.startswith(("Q2", "Q3", "Q4", "IQ1", "IQ2", "IQ3", "IQ4", "TQ", "MXFP4", "NVFP4"))


def _target(types: list[str]) -> tuple[str, int]:
    """The format a fused set of linears ends in: their one kept format; int8 g32 if they keep both
    int8 and int4; else by the bits of their types."""
    kept = {KEPT[t] for t in types if t in KEPT}
    if len(kept) == 1:
        return kept.pop()
    if kept:
        return ("int8", BLOCK)
    return ("int4", BLOCK) if all(_bits_at_most_4(t) for t in types) else ("int8", BLOCK)


class BlockReader:
    """Serves each quantized linear's `P.weight` of a checkpoint read from a GGUF as a QuantizedWeight: its
    own blocks when they map to its set's format, else dequantized and rounded to that format."""

    def __init__(self, ckpt):
        self.file = ckpt.gguf
        self.plan = {}  # hf name -> (precision, group) it ends in
        self.minimum = {}  # hf name -> whether its set keeps Q4_1 blocks: then all of it has float minima
        for i in range(int(ckpt.config["num_hidden_layers"])):
            for group in SETS:
                names = [n for n in (f"model.layers.{i}.{m}.weight" for m in group) if n in self.file.names]
                types = [self.file.type_name(n) for n in names]
                target = _target(types)
                for n in names:
                    self.plan[n] = target
                    self.minimum[n] = target == KEPT["Q4_1"] and "Q4_1" in types

    def kept(self, name: str) -> bool:
        return KEPT.get(self.file.type_name(name)) == self.plan[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def meta(self, name: str) -> qz.QuantizedWeight:
        """What load(name) returns, on the meta device: the rank files are planned from it."""
        precision, group = self.plan[name]
        out_f, in_f = self.shape(name)
        zeros = precision == "int4" and not self.kept(name) and not self.minimum[name]  # rounded: zero points

        def empty(cols, dtype):
            return torch.empty(out_f, cols, dtype=dtype, device="meta")

        return qz.QuantizedWeight(empty(in_f, torch.int8 if precision == "int8" else torch.uint8),
                                  empty(in_f // group, torch.float32),
                                  empty(in_f // group, torch.uint8) if zeros else None, None, precision,
                                  empty(in_f // group, torch.float32) if self.minimum[name] else None,
                                  grouped=precision == "int8")

    def load(self, name: str) -> qz.QuantizedWeight:
        if self.kept(name):
            qw = self.file.blocks(name)
        else:
            precision, group = self.plan[name]
            scheme = qz.QuantScheme(precision, group, zero_point=precision == "int4")
            qw = qz.quantize_rtn(self.file.load(name), scheme, name)
        if self.minimum[name] and qw.minimum is None:  # beside Q4_1 blocks: the same form (Q4_0's -8d exact)
            qw.minimum, qw.zero = qw.offsets(), None
        return qw

    def summary(self) -> dict:
        """{GGUF type: linears} of the kept blocks, {'TYPE -> int8 g32': linears} of the rounded ones."""
        out = {}
        for name, (precision, group) in self.plan.items():
            kind = self.file.type_name(name)
            key = kind if self.kept(name) else f"{kind} -> {precision} g{group}"
            out[key] = out.get(key, 0) + 1
        return out


def keep_blocks(ckpt, quant: "qz.QuantScheme | None") -> tuple[object, "qz.QuantScheme | None"]:
    """The checkpoint and scheme to convert with. A GGUF converted with --use_weight_only and no explicit
    precision, group size, zero point or algorithm (quant.from_source) keeps its blocks: its linears load as
    QuantizedWeights (see BlockReader). An explicit scheme rounds the dequantized weights again, with a
    warning when they were quantized; without --use_weight_only the engine is float."""
    if ckpt.gguf is None or quant is None:
        return ckpt, quant
    linears = [n for n in ckpt.gguf.names if n.endswith(tuple(f"{s}.weight" for s in LINEARS))]
    quantized = sorted({ckpt.gguf.type_name(n) for n in linears} - {"F32", "F16", "BF16"})
    if not quant.from_source:
        if quantized:
            _warn(f"{', '.join(quantized)} blocks of {ckpt.gguf_file} are dequantized and rounded again to "
                  f"{quant.precision} (group {quant.group_size}); without --weight_only_precision / --group_size "
                  "they are kept as they are")
        return ckpt, quant
    reader = BlockReader(ckpt)
    for key, count in sorted(reader.summary().items()):
        if "->" in key:
            kind, target = key.split(" -> ")
            _warn(f"{ckpt.gguf_file}: {count} linears of type {kind} are not kept as they are: dequantized and "
                  f"rounded to {target}")
    view = ckpt.with_index({n: (reader, n) if n in reader.plan else (ckpt.gguf, n) for n in ckpt.gguf.names})
    precisions = {p for p, _ in reader.plan.values()}
    with_zero = any(reader.minimum[n] or (p == "int4" and not reader.kept(n)) for n, (p, _) in reader.plan.items())
    scheme = qz.QuantScheme("int8" if "int8" in precisions else "int4", BLOCK, with_zero, "gguf",
                            quant.quantize_lm_head, quant.lm_head_precision, prequantized=True,
                            mixed=len(precisions) > 1, source_formats=reader.summary())
    return view, scheme


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
