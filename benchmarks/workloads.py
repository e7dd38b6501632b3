"""Workloads (parameter shapes) and the gradient sets built from them.

The canonical workloads come from model configurations (``models.py``); a user's workload file is
``{"doc": ..., "tensors": [[name, shape], ...]}``. The suite builds, per workload
and dtype set, a few *gradient sets* (parameters whose ``.grad`` holds ``randn * GRAD_AMPLITUDE``)
and rotates among them so that the caches never hold the gradients a call is about to read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .environment import SetupError
from .models import CANONICAL

REPO_ROOT = Path(__file__).resolve().parent.parent

# randn * 0.01: typical gradient magnitudes; every fp16 norm (up to ~800 for llama2_7b) stays far
# below 65504, so the torch baselines do not overflow, and halved values stay normal in fp16.
GRAD_AMPLITUDE = 0.01

DTYPE_SETS = ("bf16", "fp16", "fp32", "mixed")
_PLAIN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Few enough that gradfuse's plan cache (16 plans) keeps one plan per set, as in training, where
# the same gradient storages come back every step.
MAX_ROTATION_SETS = 8


class WorkloadError(SetupError):
    """A workload that is unknown, or a workload file that cannot be used."""


@dataclass(frozen=True)
class Workload:
    name: str
    doc: str
    tensor_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    scale: float = 1.0  # factor applied to every first dimension
    full_numel: int = 0  # elements before scaling or truncation

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def canonical_workloads() -> list[Workload]:
    """The canonical workloads, built from their model configurations (``benchmarks/models.py``)."""
    out = []
    for m in CANONICAL:
        names, shapes = zip(*m.config.tensors())
        w = Workload(m.name, m.doc, names, shapes)
        out.append(replace(w, full_numel=w.numel))
    return out


def load_workload(path: Path) -> Workload:
    try:
        data = json.loads(path.read_text())
        names, shapes = zip(*((str(n), tuple(int(d) for d in s)) for n, s in data["tensors"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WorkloadError(f"cannot read workload {path}: {e!r}") from e
    w = Workload(path.stem, str(data.get("doc", "")), names, shapes)
    return replace(w, full_numel=w.numel)


def load_workloads(names: list[str] | None = None, extra_dir: str | Path | None = None) -> list[Workload]:
    """The canonical workloads plus every ``*.json`` in ``extra_dir`` (by name), or the ``names``
    asked for, in that order."""
    available = {w.name: w for w in canonical_workloads()}
    if extra_dir is not None:
        folder = Path(extra_dir)
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if not files:
            raise WorkloadError(f"--workloads-dir {folder}: no workload files (*.json) there")
        for path in files:
            if path.stem in available:
                raise WorkloadError(f"{path}: {path.stem!r} is a canonical workload's name; rename the file")
            available[path.stem] = load_workload(path)
    if names is None:
        return list(available.values())
    missing = [n for n in names if n not in available]
    if missing:
        raise WorkloadError(f"unknown workload(s) {', '.join(missing)}; choose from {', '.join(available)}")
    return [available[n] for n in names]


def scaled(w: Workload, scale: float) -> Workload:
    """``w`` with every tensor's first dimension multiplied by ``scale`` (at least 1)."""
    if scale == 1.0:
        return w
    shapes = tuple((max(1, round(s[0] * scale)), *s[1:]) if s else s for s in w.shapes)
    return replace(w, shapes=shapes, scale=w.scale * scale)


def scaled_to(w: Workload, max_numel: int) -> Workload:
    """``w`` scaled down (never up) to about ``max_numel`` elements."""
    return scaled(w, min(1.0, max_numel / w.numel)) if w.numel > max_numel else w


def truncated(w: Workload, max_tensors: int) -> Workload:
    """The first ``max_tensors`` tensors of ``w`` (used by --quick only)."""
    if w.num_tensors <= max_tensors:
        return w
    return replace(w, tensor_names=w.tensor_names[:max_tensors], shapes=w.shapes[:max_tensors])


def tensor_dtypes(w: Workload, dtype_set: str) -> list[torch.dtype]:
    """The dtype of each tensor for a dtype set.

    "mixed": 1-D tensors (norm weights, biases) fp32 and the rest bf16, as in bf16 training that
    keeps its norms in fp32; a workload with a single rank (all 1-D) alternates bf16/fp32 instead.
    """
    if dtype_set in _PLAIN_DTYPES:
        return [_PLAIN_DTYPES[dtype_set]] * w.num_tensors
    if dtype_set != "mixed":
        raise ValueError(f"unknown dtype set {dtype_set!r}; choose from {', '.join(DTYPE_SETS)}")
    one_d = [len(s) <= 1 for s in w.shapes]
    if all(one_d) or not any(one_d):
        return [torch.float32 if i % 2 else torch.bfloat16 for i in range(w.num_tensors)]
    return [torch.float32 if d else torch.bfloat16 for d in one_d]


def nbytes(w: Workload, dtypes: list[torch.dtype]) -> int:
    """Bytes of one full set of gradients."""
    return sum(math.prod(s) * d.itemsize for s, d in zip(w.shapes, dtypes))


def rotation_count(set_bytes: int, cache_bytes: int) -> int:
    """How many gradient sets to rotate among so that together they span 3x the cache."""
    return max(1, min(MAX_ROTATION_SETS, math.ceil(3 * cache_bytes / max(set_bytes, 1))))


@dataclass
class GradSet:
    """Parameters (zeros) whose ``.grad`` holds the gradients; ``grads`` lists those in order."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor] = field(default_factory=list)


def make_grad_set(w: Workload, dtypes: list[torch.dtype], device: torch.device, seed: int) -> GradSet:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape, dtype in zip(w.shapes, dtypes):
        p = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        p.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen).mul_(GRAD_AMPLITUDE)
        params.append(p)
    return GradSet(params, [p.grad for p in params])


@dataclass
class GradGroup:
    """The rotating gradient sets of one (workload, dtype set) and their exact norms."""

    workload: Workload
    dtype_set: str
    dtypes: list[torch.dtype]
    sets: list[GradSet]
    norms: list[float]  # fp64 norm of each set when built

    @property
    def nbytes(self) -> int:
        return nbytes(self.workload, self.dtypes)

    def set(self, i: int) -> GradSet:
        return self.sets[i % len(self.sets)]


def fp64_norm(grads: list[torch.Tensor]) -> float:
    """The exact (fp64) 2-norm of all ``grads`` viewed as one vector."""
    try:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    except (TypeError, RuntimeError):  # no dtype argument in this torch, or not for this device/dtype
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def make_grad_group(w: Workload, dtype_set: str, device: torch.device, count: int, seed: int = 0) -> GradGroup:
    dtypes = tensor_dtypes(w, dtype_set)
    sets = [make_grad_set(w, dtypes, device, seed + 7919 * i) for i in range(count)]
    return GradGroup(w, dtype_set, dtypes, sets, [fp64_norm(s.grads) for s in sets])
