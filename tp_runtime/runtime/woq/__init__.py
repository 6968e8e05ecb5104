"""Weight-only quantized linears at run time.

    format.py   QuantWeight: one linear's codes, scales, zeros and prequant factor, gathered from a rank file
    kernels.py  the kernels that compute x W^T from them (torch's, tp_runtime's native ones, fallbacks)
    select.py   which kernel serves a layer: probed against the dequantized weight, timed, cached on disk
    linear.py   WeightOnlyLinear: the module the parallel layers run
"""

from tp_runtime.runtime.woq.format import QuantWeight, cat_out, collect
from tp_runtime.runtime.woq.kernels import KERNELS, Kernel, candidates
from tp_runtime.runtime.woq.linear import WeightOnlyLinear
from tp_runtime.runtime.woq.select import cache_key, cache_path, choose, probe

__all__ = ["KERNELS", "Kernel", "QuantWeight", "WeightOnlyLinear", "cache_key", "cache_path", "candidates",
           "cat_out", "choose", "collect", "probe"]
