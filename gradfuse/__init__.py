"""gradfuse: gradient clipping in one read of the gradients.

Drop-in replacements for ``torch.nn.utils``'s clipping functions, backed by fused Triton, CUDA and
C++ kernels that compute the global norm, the per-tensor norms, the NaN/Inf check and the clip
coefficient on the device in one pass, and scale only when clipping is needed.
"""

from ._backends import BACKEND_NAMES, BackendUnavailableError, available_backends
from ._engine import ClipResult
from ._patch import TorchPatch, patch_torch
from .clip import (
    clip_grad_norm,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads,
    clip_grads_with_norm_,
    get_total_norm,
)
from . import histogram, plot, sinks
from .distributed import DistributedClipResult
from .history import NormHistory
from .histogram import log2_histograms
from .monitor import GradClipper, NonFiniteCounter, QuantileThreshold, ZScoreThreshold
from .report import GradientReport, inspect_gradients
from .sinks import CSVSink, JSONLSink, TensorBoardSink, read_jsonl
from .telemetry import Telemetry, TelemetryRecord
from .training import (
    OptimizerClipper,
    clip_grad_norm_for_optimizer_,
    handoff_unsupported_reason,
    unscale_and_clip_,
)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "ClipResult",
    "DistributedClipResult",
    "available_backends",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads",
    "clip_grads_with_norm_",
    "get_total_norm",
    "patch_torch",
    "TorchPatch",
    "GradClipper",
    "GradientReport",
    "inspect_gradients",
    "NormHistory",
    "Telemetry",
    "TelemetryRecord",
    "log2_histograms",
    "CSVSink",
    "JSONLSink",
    "TensorBoardSink",
    "read_jsonl",
    "histogram",
    "plot",
    "sinks",
    "QuantileThreshold",
    "ZScoreThreshold",
    "NonFiniteCounter",
    "OptimizerClipper",
    "clip_grad_norm_for_optimizer_",
    "handoff_unsupported_reason",
    "unscale_and_clip_",
]
