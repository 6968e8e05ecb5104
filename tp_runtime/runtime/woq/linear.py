"""The weight-only quantized linear the parallel layers (runtime/layers.py) run: one chosen kernel."""

import torch
from torch import nn

from tp_runtime.runtime.woq.format import QuantWeight
from tp_runtime.runtime.woq.kernels import KERNELS
from tp_runtime.runtime.woq.select import choose


class WeightOnlyLinear(nn.Module):
    """x (..., in) -> (..., out) through the chosen kernel; no bias (the parallel layers add it)."""

    def __init__(self, w: QuantWeight):
        super().__init__()
        dtype = w.dtype
        self.kernel_name = choose(w, dtype)
        self.kernel = KERNELS[self.kernel_name](w, dtype)
        self.in_features, self.out_features = w.in_features, w.out_features
        self.register_buffer("pre_scale", w.pre_scale.to(dtype) if w.pre_scale is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale
        y = self.kernel(x.reshape(-1, self.in_features))  # (tokens, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel={self.kernel_name}"
