"""gradfuse's Triton kernels (``gradfuse.triton_kernels``): the two phases of ``gradfuse._abi``.

* ``reduce(desc, device)``: one launch, every gradient read once; the workspace, then per-tensor
  norms / S_t / max |x| / NaN-Inf counts (and factors), total, found_inf, coef and scale.
* ``scale(desc, device)``: one launch, gradients scaled in place by their chunk's factor, untouched
  where it is 1.

``desc`` is the plan's ``gradfuse._abi.ClipDesc`` (read field by field; every buffer is an address
on ``device``). CUDA tensors, or CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``
before triton is imported). Any chunk size in [1, 2^30] works (gradfuse's plans use
``gradfuse._backends.TritonBackend.chunk_size``; tests use small ones). A descriptor field the kernels cannot run with raises ValueError naming it, before any memory
is touched.
"""

from ._common import INTERPRETED
from .multi_tensor_norm import reduce
from .multi_tensor_scale import scale

# INTERPRETED: the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 when this package
# was imported), so they run on CPU tensors only; otherwise on CUDA tensors only.
__all__ = ["INTERPRETED", "reduce", "scale"]
