"""One rank's file, read a tensor at a time as the model takes it, so that loading holds one layer in flight.

    float tensors already in the compute dtype   mapped from the file (safetensors' mmap): the model uses
                                                 them as they are; the kernel reads the pages in when a step
                                                 first touches them, and may drop them again (clean file pages)
    everything else (quantized codes, scales,    read with plain file reads into a fresh, aligned buffer: the
    float tensors to cast)                       kernels re-lay codes out, casts make new tensors; a mapping
                                                 would leave the file's pages resident beside those copies

`RankTensors` (a `LazyTensors`) is a dict of name -> tensor whose values are read on `pop` / `[]`; the model pops each
tensor as it builds its layer (runtime/model.py), and the woq collector takes a layer's quantized tensors
just before (runtime/woq/format.py), so a layer's file bytes are read, re-laid out and freed before the
next one's are read. Peak anonymous memory: what the model keeps + one layer's transient copies.
"""

import torch

from tp_runtime.engine import format as ef
from tp_runtime.errors import UserError

STORED_DTYPES = ef.SAFETENSORS_DTYPES
_PENDING = object()


def is_weight(name: str, dtype: torch.dtype) -> bool:
    """A float tensor the model computes with (cast to the compute dtype), not a quantization scale."""
    return dtype.is_floating_point and not name.endswith(ef.QUANT_SUFFIXES)


class LazyTensors(dict):
    """name -> tensor, each built by `_read(name)` when it is taken (pop or []). A subclass reads one rank
    file (RankTensors) or assembles a rank's slices from another tp's files (runtime/reslice.py)."""

    def __init__(self, names):
        super().__init__(dict.fromkeys(names, _PENDING))

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if value is _PENDING:
            value = self._read(name)
            super().__setitem__(name, value)
        return value

    def pop(self, name, *default):
        if name not in self:
            if default:
                return default[0]
            raise KeyError(name)
        value = super().pop(name)
        return self._read(name) if value is _PENDING else value


class RankTensors(LazyTensors):
    """name -> tensor of one rank file, each read when it is taken (pop or []), cast to `dtype` (float
    tensors that are not quantization scales) and moved to `device`."""

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device):
        from safetensors import safe_open

        header, self.data_start = ef.read_safetensors_header(path)
        header.pop("__metadata__", None)
        self.path, self.dtype, self.device, self.entries = path, dtype, device, header
        for name, e in header.items():
            if e["dtype"] not in STORED_DTYPES:
                raise UserError(f"{path}: tensor {name} has dtype {e['dtype']}, which this tp_runtime does not read; "
                                f"re-run tp-convert")
        self._mapped = safe_open(path, framework="pt", device="cpu")
        self._file = open(path, "rb")
        super().__init__(header)

    def _read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        stored = STORED_DTYPES[e["dtype"]]
        weight = is_weight(name, stored)
        if weight and stored == self.dtype and self.device.type == "cpu":
            return self._mapped.get_tensor(name)
        begin, end = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=stored)
        if t.numel():
            self._file.seek(self.data_start + begin)
            if self._file.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - begin:
                raise UserError(f"{self.path} is truncated while reading {name}; re-run tp-convert")
        if weight and stored != self.dtype:
            t = t.to(self.dtype)
        return t.to(self.device)

    def close(self) -> None:
        self._file.close()
        self._mapped = None
