"""Plans: the per-device tables a fused backend walks, cached while the same storages come back.

A plan maps a list of gradients on one device to the tables of ``gradfuse._abi`` (addresses,
numels, dtype tags, chunk map), the reusable workspace, and a clip descriptor whose plan fields are
filled once. Training loops hand the same gradient storages every step, so the plan is built once
and found again by its fingerprint (device, addresses, numels, dtypes); building it is the only
host-to-device copy on the path.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import _abi

DTYPE_TAGS = {torch.float32: _abi.DTYPE_F32, torch.float16: _abi.DTYPE_F16, torch.bfloat16: _abi.DTYPE_BF16}

_CACHE_SIZE = 16


@dataclass(eq=False)
class DevicePlan:
    device: torch.device
    chunk_size: int
    num_tensors: int
    num_chunks: int
    total_numel: int
    # Tables (int64, on ``device``), views into one buffer so a plan costs one copy.
    addrs: torch.Tensor
    numels: torch.Tensor
    dtypes: torch.Tensor
    tensor_chunk_begin: torch.Tensor
    chunk_tensor: torch.Tensor
    chunk_start: torch.Tensor
    # Workspace reused between calls.
    chunk_partials: torch.Tensor  # float64[C]
    chunk_max_abs: torch.Tensor  # float32[C]
    chunk_counts: torch.Tensor  # int32[2C]
    ticket: torch.Tensor  # int32[1], zero between calls
    # The descriptor with the fields above filled; the engine writes the per-call ones.
    desc: _abi.ClipDesc


def fingerprint(grads: list[torch.Tensor], dtypes: tuple[torch.dtype, ...]) -> tuple:
    """What makes a plan reusable: the same addresses, sizes and dtypes in the same order, on the
    same device. (Under CUDA's unified addressing an address names one device's or the host's
    memory, so the first gradient's device stands for all of them.)"""
    return (grads[0].device, tuple(map(torch.Tensor.data_ptr, grads)), tuple(map(torch.Tensor.numel, grads)), dtypes)


def overlap_reason(grads: list[torch.Tensor]) -> str | None:
    """Why two of ``grads`` (dense, one device) share memory, or None: their spans
    [data_ptr, data_ptr + numel * itemsize) sorted by address must not overlap (two workers would
    scale the same bytes; torch scales a gradient given twice twice)."""
    spans = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size(), i) for i, g in enumerate(grads) if g.numel())
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            return f"gradients {min(i, j)} and {max(i, j)} share memory"
    return None


def build_plan(grads: list[torch.Tensor], chunk_size: int, rows: list[int] | None = None) -> DevicePlan:
    """Tables for ``grads`` (dense, non-overlapping, one device, fp32/fp16/bf16), chunked by
    ``chunk_size``. With ``rows``, gradient i (contiguous) is ``rows[i]`` entries of
    ``numel / rows[i]`` consecutive elements each (its dim-0 slices, for unit-wise norms)."""
    device = grads[0].device
    base = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    numel = torch.tensor([g.numel() for g in grads], dtype=torch.int64)
    tag = torch.tensor([DTYPE_TAGS[g.dtype] for g in grads], dtype=torch.int64)
    if rows is None:
        addrs, numels, tags = base, numel, tag
    else:  # entry e is row k of gradient i: numel_i / rows_i elements from base_i + k * row bytes
        r = torch.tensor(rows, dtype=torch.int64)
        row_bytes = numel // r.clamp_min(1) * torch.tensor([g.element_size() for g in grads], dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(grads)), r)
        first = torch.cumsum(r, 0) - r
        addrs = base[owner] + (torch.arange(owner.numel()) - first[owner]) * row_bytes[owner]
        numels, tags = (numel // r.clamp_min(1))[owner], tag[owner]
    num_tensors = numels.numel()
    chunks_per_tensor = (numels + chunk_size - 1) // chunk_size
    begin = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(chunks_per_tensor, 0)])
    # Sizes as Python ints (no read of a tensor, which a sync counter would see)
    sizes = [g.numel() for g in grads]
    per_entry = sizes if rows is None else [n // max(r, 1) for n, r in zip(sizes, rows)]
    num_chunks = sum(-(-n // chunk_size) * (1 if rows is None else r) for n, r in zip(per_entry, rows or sizes))
    chunk_tensor = torch.repeat_interleave(torch.arange(num_tensors, dtype=torch.int64), chunks_per_tensor)
    chunk_start = (torch.arange(num_chunks, dtype=torch.int64) - begin[chunk_tensor]) * chunk_size

    # One int64 buffer, so a plan costs one copy: addrs | numels | dtypes | tensor_chunk_begin | chunk_tensor | chunk_start
    meta = torch.cat([addrs, numels, tags, begin, chunk_tensor, chunk_start])
    if device.type != "cpu":
        meta = meta.pin_memory().to(device, non_blocking=True)
    t, c0 = num_tensors, 4 * num_tensors + 1

    c = max(num_chunks, 1)
    plan = DevicePlan(
        device=device,
        chunk_size=chunk_size,
        num_tensors=num_tensors,
        num_chunks=num_chunks,
        total_numel=sum(sizes),
        addrs=meta[0:t],
        numels=meta[t : 2 * t],
        dtypes=meta[2 * t : 3 * t],
        tensor_chunk_begin=meta[3 * t : 4 * t + 1],
        chunk_tensor=meta[c0 : c0 + num_chunks],
        chunk_start=meta[c0 + num_chunks :],
        chunk_partials=torch.empty(c, dtype=torch.float64, device=device),
        chunk_max_abs=torch.empty(c, dtype=torch.float32, device=device),
        chunk_counts=torch.empty(2 * c, dtype=torch.int32, device=device),
        ticket=torch.zeros(1, dtype=torch.int32, device=device),
        desc=_abi.ClipDesc(),
    )
    d = plan.desc
    for name in ("addrs", "numels", "dtypes", "tensor_chunk_begin", "chunk_tensor", "chunk_start",
                 "chunk_partials", "chunk_max_abs", "chunk_counts", "ticket"):  # fmt: skip
        setattr(d, name, getattr(plan, name).data_ptr())
    d.num_tensors, d.num_chunks, d.chunk_size = num_tensors, num_chunks, chunk_size
    return plan


class PlanCache:
    """The last plans built, keyed by (backend, chunk size, fingerprint)."""

    def __init__(self, size: int = _CACHE_SIZE):
        self._size = size
        self._plans: OrderedDict[tuple, DevicePlan] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, backend_name: str, chunk_size: int, key: tuple) -> DevicePlan | None:
        # First in, first out: a training loop hits one plan, and each touch of a key hashes
        # every address in it again.
        plan = self._plans.get((backend_name, chunk_size, key))
        if plan is None:
            self.misses += 1
        else:
            self.hits += 1
        return plan

    def insert(self, backend_name: str, chunk_size: int, key: tuple, plan: DevicePlan) -> DevicePlan:
        self._plans[(backend_name, chunk_size, key)] = plan
        if len(self._plans) > self._size:
            self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        self._plans.clear()
        self.hits = self.misses = 0


PLANS = PlanCache()

REQUIRES_GRAD = operator.attrgetter("requires_grad")


_DEVICE_CONSTANTS: dict[tuple, object] = {}


def device_constant(key: tuple, make):
    """``make()`` (index tensors built from host data), made once per ``key`` and kept; under
    torch.compile made in the graph, as constants."""
    if torch.compiler.is_compiling():
        return make()
    if key not in _DEVICE_CONSTANTS:
        if len(_DEVICE_CONSTANTS) >= 64:  # a bound, for loops whose layouts keep changing
            _DEVICE_CONSTANTS.clear()
        _DEVICE_CONSTANTS[key] = make()
    return _DEVICE_CONSTANTS[key]
