"""The write stage: a streaming safetensors writer (the header first, then each tensor as it comes), and the
tokenizer files copied into the engine.

safetensors' own save_file needs every tensor of a file in memory at once; a rank file of a
20B model is tens of GB, so the converter plans each file's tensors (names, dtypes, shapes)
up front, writes the header, and then appends tensors one at a time in the planned order.
The bytes follow the safetensors format exactly: u64 header length, JSON header padded with
spaces to 8 bytes, then the raw little-endian tensor data.
"""

import json
import os
import shutil
import struct

import torch

from tp_runtime.convert.checkpoint import SAFETENSORS_DTYPES
from tp_runtime.engine import format as ef

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class StreamingSafetensorsWriter:
    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        self.path = path
        self.order = [name for name, _, _ in specs]
        self.specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        header, offset = {}, 0
        for name, dtype, shape in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = 8 + len(raw) + offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self._expect(name)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path}: {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
        self._append(tensor)
        self.next += 1

    def write_rows(self, name: str, blocks) -> None:
        """Write the planned tensor `name` as consecutive blocks of rows (dim 0), each written as it
        comes, so a tensor need never be whole in memory (a 92544 x 6144 embedding is 1.1 GB in bf16)."""
        dtype, shape = self._expect(name)
        rows = 0
        for t in blocks:
            if t.dtype != dtype or t.dim() != len(shape) or tuple(t.shape[1:]) != shape[1:]:
                raise RuntimeError(f"{self.path}: a block of {name} is {t.dtype}{tuple(t.shape)}, "
                                   f"planned rows of {dtype}{shape}")
            self._append(t)
            rows += t.shape[0]
        if rows != shape[0]:
            raise RuntimeError(f"{self.path}: {name} got {rows} rows, planned {dtype}{shape}")
        self.next += 1

    def _expect(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"{self.path}: expected tensor {expected}, got {name}")
        return self.specs[name]

    def _append(self, tensor: torch.Tensor) -> None:
        t = tensor.contiguous()
        if t.numel():
            self.file.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        try:
            if self.next != len(self.order):
                raise RuntimeError(f"{self.path}: {len(self.order) - self.next} planned tensors were not written")
            self.file.flush()
        finally:
            self.file.close()


def copy_tokenizer(ckpt, out_dir: str, overrides: dict | None = None) -> None:
    """Copy the tokenizer files in. `overrides` rewrites tokenizer_config.json keys (None deletes one):
    a family whose tokenizer is remote code gets a built-in class instead, so no .py is ever run."""
    if ckpt.gguf_file:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt.tokenizer_dir, gguf_file=ckpt.gguf_file)
        tok.save_pretrained(out_dir)
    else:
        for name in ef.TOKENIZER_FILES:
            src = os.path.join(ckpt.tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out_dir, name))
    tok_cfg = os.path.join(out_dir, "tokenizer_config.json")
    if overrides and os.path.isfile(tok_cfg):
        with open(tok_cfg) as f:
            data = json.load(f)
        for key, value in overrides.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        with open(tok_cfg, "w") as f:
            json.dump(data, f, indent=2)
    if ckpt.generation_config and not os.path.isfile(os.path.join(out_dir, "generation_config.json")):
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(ckpt.generation_config, f, indent=2)
