"""Per-layer log2-magnitude histograms of gradients, on the device, from the exponent bits.

Bucket ``b`` of :data:`BUCKETS` counts the elements whose magnitude has ``floor(log2 |x|) = k``:
``b = 0``: exact zeros; ``b = k - MIN_EXP + 1`` for ``MIN_EXP <= k <= MAX_EXP`` (``|x|`` in
``[2^k, 2^(k+1))``, subnormals included); then Inf, then NaN. The bucket of a 16-bit value is a
table lookup on its 15 magnitude bits (exact for fp16 and bf16, subnormals too); an fp32 value is
binned by its top 16 bits (a bf16 truncation: the same exponent, so exact except that fp32 values
below 2^-133 count as zeros and a NaN whose payload lies only in the low 16 bits counts as Inf);
fp64 and complex gradients are binned after rounding to fp32.

Per dtype group, a fixed number of ops per chunk of at most ``CHUNK`` elements (the group's
gradients are flattened and concatenated chunk by chunk): bits -> table -> plus the layer's offset
-> one ``index_add_`` into a ``[layers, buckets]`` int64 table. No host read (``index_add_`` needs
no bin count, unlike ``bincount``).
"""

from __future__ import annotations

import functools

import torch

MIN_EXP = -133  # bf16's smallest subnormal is 2^-133 (fp16's is 2^-24)
MAX_EXP = 127
ZERO_BUCKET = 0
INF_BUCKET = MAX_EXP - MIN_EXP + 2
NAN_BUCKET = INF_BUCKET + 1
NUM_BUCKETS = NAN_BUCKET + 1
#: elements per chunk: bounds the temporaries (about 26 bytes per element) on the steps that ask.
CHUNK = 1 << 24


def bucket_exponent(b: int) -> int | None:
    """``k`` of bucket ``b`` (its elements have ``|x|`` in ``[2^k, 2^(k+1))``); None for the zero,
    Inf and NaN buckets."""
    return b + MIN_EXP - 1 if 0 < b < INF_BUCKET else None


def bucket_label(b: int) -> str:
    if b == ZERO_BUCKET:
        return "zero"
    if b == INF_BUCKET:
        return "inf"
    if b == NAN_BUCKET:
        return "nan"
    return f"2^{bucket_exponent(b)}"


@functools.lru_cache(maxsize=None)
def _table(dtype: torch.dtype) -> torch.Tensor:
    """int64 [32768]: the bucket of each 15-bit magnitude pattern of a 16-bit float dtype (CPU)."""
    values = torch.arange(1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).to(torch.float64)
    mantissa, exponent = torch.frexp(values)  # values = mantissa * 2^exponent, mantissa in [0.5, 1)
    buckets = (exponent.to(torch.int64) - 1) - MIN_EXP + 1
    buckets = torch.where(values == 0, ZERO_BUCKET, buckets)
    buckets = torch.where(values.isinf(), INF_BUCKET, buckets)
    return torch.where(values.isnan(), NAN_BUCKET, buckets)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _table_on(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _TABLES:  # copied to each device once
        _TABLES[key] = _table(dtype).to(device)
    return _TABLES[key]


def _as_binnable(g: torch.Tensor) -> torch.Tensor:
    """A flat real view of ``g`` in fp16, bf16 or fp32 (fp64/complex rounded to fp32)."""
    g = g.detach()
    if g.is_complex():
        g = torch.view_as_real(g)
    if g.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        g = g.to(torch.float32)
    return g.reshape(-1)


def _buckets(flat: torch.Tensor) -> torch.Tensor:
    """int64 bucket of every element of a flat fp16/bf16/fp32 tensor."""
    if flat.dtype == torch.float32:
        magnitude = torch.bitwise_right_shift(flat.view(torch.int32), 16).bitwise_and_(0x7FFF)
        return _table_on(torch.bfloat16, flat.device).index_select(0, magnitude.to(torch.int64))
    magnitude = flat.view(torch.int16).bitwise_and(0x7FFF)
    return _table_on(flat.dtype, flat.device).index_select(0, magnitude.to(torch.int64))


def _chunks(sizes: list[int], limit: int):
    """Split the concatenation of arrays of ``sizes`` into pieces of at most ``limit`` elements:
    yields lists of (array, start, stop)."""
    piece, room = [], limit
    for i, n in enumerate(sizes):
        start = 0
        while start < n:
            take = min(n - start, room)
            piece.append((i, start, start + take))
            start += take
            room -= take
            if room == 0:
                yield piece
                piece, room = [], limit
    if piece:
        yield piece


@functools.lru_cache(maxsize=256)
def _piece_tables(piece: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tensors of each part's row offset and length, copied once per chunk layout (a
    blocking host-to-device copy would wait for the device)."""
    offsets = torch.tensor([row * NUM_BUCKETS for row, _ in piece], dtype=torch.int64)
    lengths = torch.tensor([n for _, n in piece], dtype=torch.int64)
    return offsets.to(device), lengths.to(device)


@torch.no_grad()
def log2_histograms(grads: list[torch.Tensor], *, chunk: int = CHUNK) -> torch.Tensor:
    """int64 ``[len(grads), NUM_BUCKETS]``: each gradient's log2-magnitude histogram, on the device
    of the first gradient (see the module docstring for the buckets)."""
    if not grads:
        raise ValueError("log2_histograms: no gradients given")
    device = grads[0].device
    out = torch.zeros(len(grads) * NUM_BUCKETS, dtype=torch.int64, device=device)
    flats = [_as_binnable(g).to(device) for g in grads]
    groups: dict[torch.dtype, list[int]] = {}
    for i, f in enumerate(flats):
        if f.numel():
            groups.setdefault(f.dtype, []).append(i)
    for members in groups.values():
        sizes = [flats[i].numel() for i in members]
        for piece in _chunks(sizes, chunk):
            parts = [flats[members[k]][a:b] for k, a, b in piece]
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            offsets, lengths = _piece_tables(tuple((members[k], b - a) for k, a, b in piece), device)
            offset = torch.repeat_interleave(offsets, lengths, output_size=flat.numel())
            codes = _buckets(flat).add_(offset)
            out.index_add_(0, codes, torch.ones((), dtype=torch.int64, device=device).expand(codes.numel()))
    return out.view(len(grads), NUM_BUCKETS)
