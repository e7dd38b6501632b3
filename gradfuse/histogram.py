"""Per-layer log2-magnitude histograms of gradients, on the device, from the exponent bits.

Bucket ``b`` of the :data:`NUM_BUCKETS` counts the elements whose magnitude has ``floor(log2 |x|) = k``:
``b = 0``: exact zeros; ``b = k - MIN_EXP + 1`` for ``MIN_EXP <= k <= MAX_EXP`` (``|x|`` in
``[2^k, 2^(k+1))``, subnormals included); then Inf, then NaN. The bucket of a 16-bit value is a
table lookup on its 15 magnitude bits (exact for fp16 and bf16, subnormals too); an fp32 value is
binned by its top 16 bits (a bf16 truncation: the same exponent, so exact except that fp32 values
below 2^-133 count as zeros and a NaN whose payload lies only in the low 16 bits counts as Inf);
fp64 and complex gradients are binned after rounding to fp32.

The elements are counted by magnitude pattern (``index_add_`` into ``[layers, 2^15]`` counts: no
host read, unlike ``bincount``, which reads its largest value), then each table is folded into the
buckets with one ``index_add_`` per dtype group. Off the CPU a fixed number of ops per chunk of at
most ``CHUNK`` elements (the gradients concatenated, each element's row offset added); on the CPU
one ``index_add_`` per gradient (there bandwidth, not launches, is what costs).
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
#: the 15-bit magnitude patterns of a 16-bit float (sign dropped): first counted, then folded.
PATTERNS = 1 << 15
#: elements per chunk off the CPU: bounds the temporaries (about 14 bytes per element).
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


def _magnitudes(flat: torch.Tensor) -> torch.Tensor:
    """The 15 magnitude bits of each element (of its top 16 bits for fp32), as int32 (an index)."""
    if flat.dtype == torch.float32:
        return torch.bitwise_right_shift(flat.view(torch.int32), 16).bitwise_and_(0x7FFF)
    return flat.view(torch.int16).to(torch.int32).bitwise_and_(0x7FFF)


@functools.lru_cache(maxsize=256)
def _piece_tables(piece: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tensors of each part's row offset and length, copied once per chunk layout (a
    blocking host-to-device copy would wait for the device)."""
    offsets = torch.tensor([row * PATTERNS for row, _ in piece], dtype=torch.int32)
    lengths = torch.tensor([n for _, n in piece], dtype=torch.int64)
    return offsets.to(device), lengths.to(device)


def _count_patterns(raw: torch.Tensor, flats: list[torch.Tensor], chunk: int, per_tensor: bool) -> None:
    """raw[r * PATTERNS + m] += the elements of flats[r] whose magnitude bits are m.

    ``per_tensor`` (the CPU): one ``index_add_`` per tensor (memory bound: no concatenation, no
    per-element row offsets). Otherwise (devices where launches cost more than bandwidth) a fixed
    number of ops per chunk: concatenate, magnitude bits plus each element's row offset, one
    ``index_add_``."""
    one = torch.ones((), dtype=torch.int32, device=raw.device)
    if per_tensor:
        for r, f in enumerate(flats):
            if f.numel():
                raw[r * PATTERNS : (r + 1) * PATTERNS].index_add_(0, _magnitudes(f), one.expand(f.numel()))
        return
    for piece in _chunks([f.numel() for f in flats], chunk):
        parts = [flats[r][a:b] for r, a, b in piece]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        offsets, lengths = _piece_tables(tuple((r, b - a) for r, a, b in piece), raw.device)
        codes = torch.repeat_interleave(offsets, lengths, output_size=flat.numel()).add_(_magnitudes(flat))
        raw.index_add_(0, codes, one.expand(codes.numel()))


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


@torch.no_grad()
def log2_histograms(grads: list[torch.Tensor], *, chunk: int = CHUNK) -> torch.Tensor:
    """int64 ``[len(grads), NUM_BUCKETS]``: each gradient's log2-magnitude histogram, on the device
    of the first gradient (see the module docstring for the buckets)."""
    if not grads:
        raise ValueError("log2_histograms: no gradients given")
    device = grads[0].device
    out = torch.empty((len(grads), NUM_BUCKETS), dtype=torch.int64, device=device)
    flats = [_as_binnable(g).to(device) for g in grads]
    groups: dict[torch.dtype, list[int]] = {}
    for i, f in enumerate(flats):
        groups.setdefault(torch.float16 if f.dtype == torch.float16 else torch.bfloat16, []).append(i)  # fp32: bf16's table
    for table_dtype, members in groups.items():
        raw = torch.zeros(len(members) * PATTERNS, dtype=torch.int32, device=device)
        _count_patterns(raw, [flats[i] for i in members], chunk, per_tensor=device.type == "cpu")
        folded = torch.zeros((len(members), NUM_BUCKETS), dtype=torch.int64, device=device)
        folded.index_add_(1, _table_on(table_dtype, device), raw.view(len(members), PATTERNS).to(torch.int64))
        if len(groups) == 1:
            return folded
        out.index_copy_(0, _rows_on(tuple(members), device), folded)
    return out


@functools.lru_cache(maxsize=256)
def _rows_on(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device)  # copied once per set of rows
