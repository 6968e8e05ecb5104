"""A streaming safetensors writer: the header first, then each tensor as it comes.

safetensors' own save_file needs every tensor of a file in memory at once; a rank file of a
20B model is tens of GB, so the converter plans each file's tensors (names, dtypes, shapes)
up front, writes the header, and then appends tensors one at a time in the planned order.
The bytes follow the safetensors format exactly: u64 header length, JSON header padded with
spaces to 8 bytes, then the raw little-endian tensor data.
"""

import json
import struct

import torch

from tp_runtime.convert.checkpoint import SAFETENSORS_DTYPES

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
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"{self.path}: expected tensor {expected}, got {name}")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path}: {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
        t = tensor.contiguous()
        if t.numel():
            self.file.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        try:
            if self.next != len(self.order):
                raise RuntimeError(f"{self.path}: {len(self.order) - self.next} planned tensors were not written")
            self.file.flush()
        finally:
            self.file.close()
