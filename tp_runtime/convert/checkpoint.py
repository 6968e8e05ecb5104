"""Lazy readers of Hugging Face checkpoints, one tensor at a time.

    safetensors (one file or many with model.safetensors.index.json): the header is parsed here and
        each tensor is read with plain file reads into its own buffer. safetensors' own safe_open
        mmaps the file, and every page it touches stays in the process's RSS until unmapped, so
        converting a big model through it would show the whole model in RSS; plain reads leave the
        file in the page cache, which the kernel can drop.
    .bin (pytorch_model*.bin): torch.load(weights_only=True, mmap=True); never unpickles objects.
    .gguf: Llama-family files tensor by tensor (gguf.py, blocks kept or dequantized one tensor at a time);
        other architectures through transformers' gguf_file= loader, which dequantizes the whole model.
"""

import json
import os
import struct

import torch

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError, read_json_object

SAFETENSORS_DTYPES = ef.SAFETENSORS_DTYPES  # (the writer imports it from here)


class SafetensorsReader:
    """One safetensors file: header parsed once, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise UserError(f"{self.path}: tensor {name} has dtype {code}, which tp-convert does not read")
        return SAFETENSORS_DTYPES[code]

    def load(self, name: str) -> torch.Tensor:
        begin, end = self.entries[name]["data_offsets"]
        out = torch.empty(self.shape(name), dtype=self.dtype(name))
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(memoryview(buf))
            if got != end - begin:
                raise UserError(f"{self.path} is truncated while reading {name}")
        return out


class Checkpoint:
    """A Hugging Face model directory (or one .gguf file) seen as named tensors + configs."""

    def __init__(self, config: dict, tensors: dict, generation_config: dict | None, tokenizer_dir: str,
                 gguf_file: str | None = None):
        self.config = config
        # name -> (reader, key) or name -> tensor (in memory); or a function that indexes the
        # weights on first use, so a config problem is reported before any weight file is read.
        self._index = tensors
        self.generation_config = generation_config
        self.tokenizer_dir = tokenizer_dir
        self.gguf_file = gguf_file
        self.gguf = None  # a .gguf read tensor by tensor: its gguf.GgufFile

    def with_index(self, index: dict) -> "Checkpoint":
        """The same checkpoint with other readers behind its names (a GGUF's blocks, gguf.keep_blocks)."""
        out = Checkpoint(self.config, index, self.generation_config, self.tokenizer_dir, self.gguf_file)
        out.gguf = self.gguf
        return out

    @property
    def _tensors(self) -> dict:
        if callable(self._index):
            self._index = self._index()
        return self._index

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._get(name)
        return tuple(src.shape) if isinstance(src, torch.Tensor) else src[0].shape(src[1])

    def dtype(self, name: str) -> torch.dtype:
        src = self._get(name)
        return src.dtype if isinstance(src, torch.Tensor) else src[0].dtype(src[1])

    def load(self, name: str) -> torch.Tensor:
        src = self._get(name)
        return src if isinstance(src, torch.Tensor) else src[0].load(src[1])

    def meta(self, name: str):
        """The tensor on the meta device (shape and dtype, no data); a reader that serves quantized weights
        describes them itself (gguf.py's blocks)."""
        src = self._get(name)
        if not isinstance(src, torch.Tensor) and hasattr(src[0], "meta"):
            return src[0].meta(src[1])
        return torch.empty(self.shape(name), dtype=self.dtype(name), device="meta")

    def _get(self, name):
        try:
            return self._tensors[name]
        except KeyError:
            raise UserError(f"the checkpoint has no tensor {name!r}; is it complete?") from None


def _read_json(path: str, what: str) -> dict:
    return read_json_object(path, f"the {what} is corrupt")


def open_checkpoint(model_dir: str) -> Checkpoint:
    if model_dir.endswith(".gguf"):
        return _open_gguf(model_dir)
    if not os.path.isdir(model_dir):
        raise UserError(f"--model_dir {model_dir!r} is neither a directory nor a .gguf file")
    ggufs = [f for f in os.listdir(model_dir) if f.endswith(".gguf")]
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        if len(ggufs) == 1:
            return _open_gguf(os.path.join(model_dir, ggufs[0]))
        raise UserError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    config = _read_json(cfg_path, "model config")
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = _read_json(gen_path, "generation config") if os.path.isfile(gen_path) else None

    def index():
        tensors = _index_safetensors(model_dir)
        return tensors if tensors is not None else _index_bin(model_dir)

    return Checkpoint(config, index, gen, model_dir)


def _index_safetensors(model_dir: str) -> dict | None:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index, "safetensors index").get("weight_map", {})
        readers = {}
        tensors = {}
        for name, fname in weight_map.items():
            path = os.path.join(model_dir, fname)
            if fname not in readers:
                if not os.path.isfile(path):
                    raise UserError(f"{index} names {fname}, which is missing from {model_dir}")
                readers[fname] = SafetensorsReader(path)
            if name not in readers[fname].entries:
                raise UserError(f"{path} lacks {name}, which {index} says it holds")
            tensors[name] = (readers[fname], name)
        return tensors
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        return None
    tensors = {}
    for fname in files:
        reader = SafetensorsReader(os.path.join(model_dir, fname))
        for name in reader.entries:
            tensors[name] = (reader, name)
    return tensors


def _index_bin(model_dir: str) -> dict:
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".bin") and f.startswith("pytorch_model"))
    if not files:
        raise UserError(
            f"{model_dir} has no *.safetensors and no pytorch_model*.bin weights; "
            "tp-convert reads safetensors, .bin (with torch.load weights_only=True) or a .gguf file"
        )
    tensors = {}
    for fname in files:
        path = os.path.join(model_dir, fname)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError / RuntimeError for unsafe or odd pickles
            raise UserError(
                f"{path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}); it holds more "
                "than tensors. Convert it to safetensors in a Python you trust, e.g. "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)"
            ) from None
        if not isinstance(state, dict):
            raise UserError(f"{path} does not hold a state dict")
        tensors.update(state)
    return tensors


def _open_gguf(path: str) -> Checkpoint:
    """GGUF: the Llama-family architectures tensor by tensor (gguf.py); others through transformers,
    which dequantizes the whole model in memory (no memory bound there)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    from tp_runtime.convert import gguf

    opened = gguf.open_gguf(path)
    if opened is not None:
        file, gen = opened
        folder, name = os.path.split(os.path.abspath(path))
        ckpt = Checkpoint(dict(file.config, torch_dtype="float32"), {n: (file, n) for n in file.names}, gen, folder,
                          gguf_file=name)
        ckpt.gguf = file
        return ckpt
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise UserError(f"reading .gguf needs transformers ({e})") from None
    folder, name = os.path.split(os.path.abspath(path))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise UserError(f"reading .gguf needs the packages gguf and accelerate ({e})") from None
    tensors = dict(model.state_dict())
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"  # dequantized by the loader
    try:
        gen = GenerationConfig.from_model_config(config).to_dict()
    except Exception:
        gen = None
    return Checkpoint(cfg, tensors, gen, folder, gguf_file=name)
