"""gradfuse's Triton kernels (``gradfuse.triton_kernels``): the two phases of ``gradfuse._abi``.

* ``reduce(plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result)``:
  one launch, every gradient read once; per-tensor norms, total, found_inf, coef, scale.
* ``scale(plan, scale, zero_if_scale_is_zero)``: one launch, gradients scaled in place unless
  ``scale == 1``.

CUDA tensors, or CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1`` before triton is
imported). Build plans with ``CHUNK_SIZE`` (any chunk size works; tests use small ones).
"""

from .multi_tensor_norm import _INTERPRET as INTERPRETED, CHUNK_SIZE, reduce
from .multi_tensor_scale import scale

# INTERPRETED: the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 when this package
# was imported), so they run on CPU tensors only; otherwise on CUDA tensors only.
__all__ = ["CHUNK_SIZE", "INTERPRETED", "reduce", "scale"]
