"""The Triton kernels (gradfuse.triton_kernels) against an fp64 reference, through the descriptor.

Each test builds the plan tables, the workspace and the outputs with torch, fills a
``gradfuse._abi.ClipDesc`` by hand and launches ``reduce`` / ``scale`` directly: every output of
the contract is compared with an fp64 torch reference (S_t, norms, max |x| with NaN, NaN/Inf
counts, total, found_inf, coef, scale, per-tensor factors), for every norm kind, policy and flag,
finite extremes (the exact re-read), NaN/Inf at chunk edges, empty tensors, misaligned views and
mixed dtypes. Sized for Triton's interpreter (~30 ms per program, ~2 s per 10^6 elements): small
chunks make many chunks cheaply; a few 8292-element chunks run the unmasked body loop.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import assert_bitwise_equal, bits

from gradfuse import _abi

tk = pytest.importorskip("gradfuse.triton_kernels")

DEVICE = torch.device("cpu" if tk.INTERPRETED else "cuda")
if DEVICE.type == "cuda" and not torch.cuda.is_available():  # pragma: no cover - triton without a GPU or interpreter
    pytest.skip("the Triton kernels were built for CUDA and there is no CUDA device", allow_module_level=True)

L2, L1, P, INF, NEG_INF, L0 = (_abi.NORM_L2, _abi.NORM_L1, _abi.NORM_P, _abi.NORM_INF, _abi.NORM_NEG_INF, _abi.NORM_L0)
PROPAGATE, SKIP, ZERO = _abi.POLICY_PROPAGATE, _abi.POLICY_SKIP, _abi.POLICY_ZERO
TAGS = {torch.float32: _abi.DTYPE_F32, torch.float16: _abi.DTYPE_F16, torch.bfloat16: _abi.DTYPE_BF16}
BODY_CHUNK = 8292  # > 2 * BLOCK * UNROLL_32 and > BLOCK * UNROLL_16: heads, bodies and tails
ORDER = {L2: 2.0, L1: 1.0, INF: math.inf, NEG_INF: -math.inf, L0: 0.0}
SENTINEL = 12345.0  # every output starts as this: an output the kernel does not write fails


def t_(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def randn(n: int, dtype=torch.float32, scale=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def view(n: int, offset: int, dtype=torch.float32, scale=1.0, seed=0) -> torch.Tensor:
    """n elements starting ``offset`` elements into their storage (misaligned for offset % 4 != 0)."""
    return randn(n + offset, dtype, scale, seed)[offset:]


class Clip:
    """One plan over ``grads`` (dense, on DEVICE): tables, workspace, outputs and the descriptor."""

    def __init__(self, grads: list[torch.Tensor], chunk_size: int):
        self.grads = grads
        numels = [g.numel() for g in grads]
        per_tensor = [-(-n // chunk_size) for n in numels]
        begin = [0]
        for k in per_tensor:
            begin.append(begin[-1] + k)
        chunk_tensor = [t for t, k in enumerate(per_tensor) for _ in range(k)]
        chunk_start = [i * chunk_size for k in per_tensor for i in range(k)]
        T, C = len(grads), len(chunk_tensor)

        def i64(values):
            return torch.tensor(values, dtype=torch.int64, device=DEVICE)

        self.tables = dict(
            addrs=i64([g.data_ptr() for g in grads]),
            numels=i64(numels),
            dtypes=i64([TAGS[g.dtype] for g in grads]),
            tensor_chunk_begin=i64(begin),
            chunk_tensor=i64(chunk_tensor),
            chunk_start=i64(chunk_start),
        )
        self.workspace = dict(
            chunk_partials=torch.empty(max(C, 1), dtype=torch.float64, device=DEVICE),
            chunk_max_abs=torch.empty(max(C, 1), dtype=torch.float32, device=DEVICE),
            chunk_counts=torch.empty(2 * max(C, 1), dtype=torch.int32, device=DEVICE),
            ticket=torch.zeros(1, dtype=torch.int32, device=DEVICE),
        )
        self.out = dict(
            tensor_norms=torch.full((T,), SENTINEL, device=DEVICE),
            tensor_partials=torch.full((T,), SENTINEL, dtype=torch.float64, device=DEVICE),
            tensor_max_abs=torch.full((T,), SENTINEL, device=DEVICE),
            tensor_counts=torch.full((2 * T,), -1, dtype=torch.int64, device=DEVICE),
            tensor_scales=torch.full((T,), SENTINEL, device=DEVICE),
            result=torch.full((_abi.RESULT_SIZE,), SENTINEL, device=DEVICE),
        )
        d = self.desc = _abi.ClipDesc()
        for name, buf in {**self.tables, **self.workspace, **self.out}.items():
            setattr(d, name, buf.data_ptr())
        d.num_tensors, d.num_chunks, d.chunk_size = T, C, chunk_size

    def reduce(self, kind, p=None, max_norm=1.0, *, max_norm_tensor=None, inv_scale=None, policy=PROPAGATE,
               write_scales=False):  # fmt: skip
        d = self.desc
        d.norm_kind, d.p = kind, float(ORDER[kind] if p is None else p)
        d.max_norm, d.max_norm_ptr = float(max_norm), 0 if max_norm_tensor is None else max_norm_tensor.data_ptr()
        d.inv_scale_ptr = 0 if inv_scale is None else inv_scale.data_ptr()
        d.policy, d.flags = policy, _abi.FLAG_WRITE_TENSOR_SCALES if write_scales else 0
        tk.reduce(d, DEVICE)
        return {name: buf.cpu() for name, buf in self.out.items()}

    def scale(self, factor: torch.Tensor, *, per_tensor=False, zero_if_scale_is_zero=False):
        d = self.desc
        d.flags = _abi.FLAG_READ_TENSOR_SCALES if per_tensor else 0
        d.tensor_scales = factor.data_ptr() if per_tensor else 0
        d.scale_ptr = 0 if per_tensor else factor.data_ptr()
        d.zero_if_scale_is_zero = int(zero_if_scale_is_zero)
        tk.scale(d, DEVICE)


# ---- the fp64 reference ----------------------------------------------------------------------------
def _combine(kind, values: torch.Tensor) -> float:
    if kind == INF:
        return float(values.max()) if len(values) else 0.0  # torch.max propagates NaN
    if kind == NEG_INF:
        return float(values.min()) if len(values) else math.inf
    return float(values.sum())


def _partial(kind, p, x: torch.Tensor) -> float:
    a = x.abs()
    if kind == L2:
        return float((x * x).sum())
    if kind == L1:
        return float(a.sum())
    if kind == P:
        return float((a**p).sum())
    if kind == L0:
        return float((x != 0).sum())
    return _combine(kind, a)


def _root(kind, p, s: float, inv: float) -> float:
    if kind == L0:
        return s
    if kind == L2:
        return math.sqrt(s) * inv if s == s else s
    if kind == P:
        return float(torch.tensor(s, dtype=torch.float64) ** (1.0 / p)) * inv
    return s * inv


def _coef(max_norm: float, x: float) -> float:
    t32 = float(torch.tensor(x, dtype=torch.float32))
    t = x if math.isinf(t32) else t32
    c = max_norm / (t + _abi.CLIP_EPS)
    return float(torch.clamp(torch.tensor(c, dtype=torch.float64), max=1.0))  # NaN stays NaN


def _policy(factor: float, found: bool, policy: int) -> float:
    if found and policy == SKIP:
        return 1.0
    if found and policy == ZERO:
        return 0.0
    return factor


def reference(grads, kind, p=None, max_norm=1.0, inv=1.0, policy=PROPAGATE) -> dict:
    """Every output of the contract in fp64 (fp32 where the contract rounds to fp32)."""
    p = ORDER[kind] if p is None else p
    xs = [g.detach().cpu().double().flatten() for g in grads]
    S = [_partial(kind, p, x) for x in xs]
    norms = [_root(kind, p, s, inv) for s in S]
    counts = [(int(x.isnan().sum()), int(x.isinf().sum())) for x in xs]
    found = any(n + i for n, i in counts)
    terms = [float(s != 0) for s in S] if kind == L0 else S
    total = _root(kind, p, _combine(kind if kind != L0 else L1, torch.tensor(terms, dtype=torch.float64)), inv)
    coef = _coef(max_norm, total)
    norms32 = [float(torch.tensor(n, dtype=torch.float32)) for n in norms]
    return dict(
        tensor_partials=torch.tensor(S, dtype=torch.float64),
        tensor_norms=torch.tensor(norms, dtype=torch.float64),
        tensor_max_abs=torch.tensor([float(x.abs().max()) if len(x) else 0.0 for x in xs], dtype=torch.float32),
        tensor_counts=torch.tensor([c for pair in counts for c in pair], dtype=torch.int64),
        tensor_scales=torch.tensor([_policy(_coef(max_norm, n) * inv, found, policy) for n in norms32]),
        total=total,
        found_inf=found,
        coef=coef,
        scale=_policy(coef * inv, found, policy),
    )


def same_values(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bitwise equal, except that any NaN equals any NaN (a GPU's NaN is not a CPU's)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
    assert torch.equal(bits(got[~nan]), bits(want[~nan])), f"{what}: not bitwise equal"


def close(got, want, rtol, what: str, atol=0.0) -> None:
    """|got - want| <= rtol |want| + atol where want is finite; the same NaN and Inf elsewhere."""
    got = torch.as_tensor(got, dtype=torch.float64).flatten()
    want = torch.as_tensor(want, dtype=torch.float64).flatten()
    bad = got.isnan() != want.isnan()
    inf = want.isinf()
    bad |= inf & (got != want)
    finite = want.isfinite()
    bad[finite] |= (got[finite] - want[finite]).abs() > rtol * want[finite].abs() + atol
    i = bad.nonzero().flatten()[:4].tolist()
    assert not i, f"{what}: at {i} got {got[i].tolist()}, want {want[i].tolist()} (rtol {rtol:g}, atol {atol:g})"


def f32(x):
    """fp32(x), the rounding every fp32 output goes through, back in fp64."""
    return torch.as_tensor(x, dtype=torch.float64).to(torch.float32).double()


def check(out: dict, ref: dict, kind, *, write_scales=False) -> None:
    """Every output of ``Clip.reduce`` against ``reference``. Sums accumulate fp32 lanes (a few
    terms each) in fp64; max, min and counts are exact. fp32 outputs are compared with the fp32
    rounding of the reference, to within that rounding (one ulp: 2^-149 absolute for subnormals)."""
    exact = kind in (INF, NEG_INF, L0)
    rtol = 0.0 if exact else 4e-6
    r = out["result"].double()
    close(out["tensor_partials"], ref["tensor_partials"], rtol, "tensor_partials (S_t)")
    close(out["tensor_norms"], f32(ref["tensor_norms"]), rtol + 2**-23, "tensor_norms", 2**-149)
    same_values(out["tensor_max_abs"], ref["tensor_max_abs"], "tensor_max_abs")
    counts, want = out["tensor_counts"], ref["tensor_counts"]
    assert torch.equal(counts, want), f"tensor_counts {counts.tolist()} vs {want.tolist()}"
    close(r[_abi.RESULT_TOTAL], f32(ref["total"]), rtol + 2**-23, "total", 2**-149)
    assert float(r[_abi.RESULT_FOUND_INF]) == float(ref["found_inf"])
    close(r[_abi.RESULT_COEF], f32(ref["coef"]), 2 * rtol + 2**-22, "coef", 2**-149)
    close(r[_abi.RESULT_SCALE], f32(ref["scale"]), 2 * rtol + 2**-22, "scale", 2**-149)
    if write_scales:
        close(out["tensor_scales"], f32(ref["tensor_scales"]), 2 * rtol + 2**-22, "tensor_scales", 2**-149)
    else:
        assert bool((out["tensor_scales"] == SENTINEL).all()), "tensor_scales written without FLAG_WRITE_TENSOR_SCALES"


# ---- reduce: every kind, mixed dtypes, heads / bodies / tails, empty tensors -------------------------
KINDS = [(L2, None), (L1, None), (P, 3.0), (P, 0.5), (P, -1.5), (INF, None), (NEG_INF, None), (L0, None)]


def mixed_grads() -> list[torch.Tensor]:
    zeros = torch.zeros(40, device=DEVICE)
    zeros[7] = 0.25
    return [
        randn(20000, scale=1e-3, seed=1),  # 3 chunks: body + tail
        view(9000, 3, torch.float16, seed=2),  # misaligned: head + body + tail
        torch.empty(0, device=DEVICE),
        view(8500, 1, torch.bfloat16, seed=3),
        view(5, 1, seed=4),  # head only
        zeros,  # L0 counts 1, NEG_INF min 0, P < 0 sums inf
    ]


@pytest.mark.parametrize("kind,p", KINDS, ids=[f"{k}-{p}" for k, p in KINDS])
def test_reduce_matches_fp64_reference(kind, p):
    grads = mixed_grads()
    clip = Clip(grads, BODY_CHUNK)
    out = clip.reduce(kind, p, max_norm=0.75, write_scales=True)
    check(out, reference(grads, kind, p, max_norm=0.75), kind, write_scales=True)
    assert int(clip.workspace["ticket"]) == 0, "the last program resets the ticket"


@pytest.mark.parametrize("kind", [L2, INF, NEG_INF, L0])
def test_finalize_carries_tensors_across_scan_steps(kind, monkeypatch):
    """FINAL_BLOCK = 8 chunks per step: tensors that open, span and close across steps."""
    monkeypatch.setattr(tk.multi_tensor_norm, "FINAL_BLOCK", 8)
    grads = [randn(300, seed=5), randn(7, torch.float16, seed=6), torch.empty(0, device=DEVICE),
             randn(64, torch.bfloat16, seed=7), randn(1, seed=8), randn(520, seed=9)]  # fmt: skip
    grads[5][200] = float("nan")  # in a tensor carried over three steps
    grads[0][33] = float("inf")
    clip = Clip(grads, 32)  # 10 + 1 + 0 + 2 + 1 + 17 chunks: 4 steps
    for policy in (PROPAGATE, SKIP):
        out = clip.reduce(kind, max_norm=2.0, policy=policy, write_scales=True)
        check(out, reference(grads, kind, max_norm=2.0, policy=policy), kind, write_scales=True)


def test_device_scalars_and_inverse_loss_scale():
    """max_norm and inv_scale from the device; norms are scaled by inv (L0 is not)."""
    grads = [randn(700, seed=10) * 4096, randn(300, torch.bfloat16, seed=11)]
    clip = Clip(grads, 256)
    max_norm, inv = t_([3.0]), t_([1.0 / 4096])
    for kind in (L2, L0):
        out = clip.reduce(kind, max_norm=99.0, max_norm_tensor=max_norm, inv_scale=inv, write_scales=True)
        check(out, reference(grads, kind, max_norm=3.0, inv=1.0 / 4096), kind, write_scales=True)


def test_no_tensors_and_only_empty_tensors():
    for grads in ([], [torch.empty(0, device=DEVICE), torch.empty(0, dtype=torch.bfloat16, device=DEVICE)]):
        clip = Clip(grads, 64)
        for kind in (L2, NEG_INF, L0):
            check(clip.reduce(kind, write_scales=True), reference(grads, kind), kind, write_scales=True)


def test_same_bits_on_every_run_and_fresh_values_on_reuse():
    grads = mixed_grads()
    clip = Clip(grads, 1024)
    first = clip.reduce(P, 2.5, write_scales=True)
    workspace = {k: v.clone() for k, v in clip.workspace.items()}
    again = clip.reduce(P, 2.5, write_scales=True)
    for name in first:
        assert_bitwise_equal(again[name], first[name], name)
    for name in workspace:
        assert_bitwise_equal(clip.workspace[name], workspace[name], name)
    grads[0].mul_(3)  # the same plan, new values: nothing stale
    check(clip.reduce(L2, write_scales=True), reference(grads, L2), L2, write_scales=True)


# ---- the exact second read --------------------------------------------------------------------------
EXTREMES = [
    # (kind, p, values, dtype): finite values whose fp32 terms underflow or overflow
    (L2, None, [1e-23] * 1000, torch.float32),  # squares are 0 in fp32: the norm is 3.1623e-22
    (L2, None, [3e19] * 10 + [1e30] * 3 + [1.0], torch.float32),  # squares overflow fp32
    (L2, None, [1e-42] * 50 + [0.0] * 7, torch.float32),  # subnormal max |x|
    (L2, None, [1e38] * 4 + [-2.5e37], torch.bfloat16),
    (L1, None, [3e38] * 4100, torch.float32),  # lane sums overflow; the norm is beyond fp32: coef from fp64
    (L1, None, [1e-40] * 100, torch.float32),
    (P, 3.0, [1e13] * 50 + [-2e12], torch.float32),  # cubes overflow fp32
    (P, 4.0, [1e-20] * 30, torch.bfloat16),  # fourth powers underflow
]


@pytest.mark.parametrize("kind,p,values,dtype", EXTREMES, ids=[f"{k}-{v[0]:g}-{str(d)[6:]}" for k, _, v, d in EXTREMES])
def test_finite_extremes_give_exact_norms(kind, p, values, dtype):
    x = t_(values, dtype)
    grads = [x, randn(300, seed=12)]  # a chunk of ordinary values beside them
    clip = Clip(grads, 8192)  # 4100 elements: two per lane
    out = clip.reduce(kind, p, max_norm=1.0)
    ref = reference(grads, kind, p, max_norm=1.0)
    check(out, ref, kind)
    assert float(out["result"][_abi.RESULT_FOUND_INF]) == 0.0, "finite values are not NaN/Inf"
    assert 0.0 < float(out["result"][_abi.RESULT_SCALE]) <= 1.0, "finite extremes clip by a finite, non-zero factor"
    want = [(g.cpu().double() * ref["scale"]).to(torch.float32).to(g.dtype) for g in grads]
    clip.scale(clip.out["result"][_abi.RESULT_SCALE :].clone())
    for g, w in zip(grads, want):
        close(g.cpu().double(), w.double(), 2**-7, "clipped gradient", 2**-149)


def test_tiny_norm_is_three_point_one_six_e_minus_22():
    clip = Clip([t_([1e-23] * 1000)], 4096)
    out = clip.reduce(L2)
    assert out["tensor_norms"][0].item() == pytest.approx(3.1623e-22, rel=1e-4, abs=0)


# ---- NaN / Inf: exact counts wherever they sit, policies ------------------------------------------
def nonfinite_grads() -> list[torch.Tensor]:
    a = randn(256, seed=13)
    a[0], a[63], a[64], a[255] = float("nan"), float("inf"), float("-inf"), float("nan")  # chunk edges (64)
    b = view(70, 1, torch.bfloat16, seed=14)
    b[0] = float("inf")  # in the head of a misaligned view
    c = randn(130, torch.float16, seed=15)
    c[129] = float("nan")  # in the tail
    return [a, b, c, randn(100, seed=16)]


@pytest.mark.parametrize("policy", [PROPAGATE, SKIP, ZERO])
@pytest.mark.parametrize("kind", [L2, INF, NEG_INF, L0])
def test_nonfinite_counts_max_abs_and_policies(kind, policy):
    grads = nonfinite_grads()
    clip = Clip(grads, 64)
    out = clip.reduce(kind, policy=policy, write_scales=True)
    ref = reference(grads, kind, policy=policy)
    check(out, ref, kind, write_scales=True)
    assert out["tensor_counts"].tolist() == [2, 2, 0, 1, 1, 0, 0, 0]
    assert out["tensor_max_abs"][1] == float("inf") and math.isnan(out["tensor_max_abs"][0])


# ---- scale ----------------------------------------------------------------------------------------
def scale_grads() -> list[torch.Tensor]:
    return [randn(5000, seed=17), view(3001, 3, torch.float16, seed=18), view(2999, 1, torch.bfloat16, seed=19),
            randn(9, seed=20)]  # fmt: skip


@pytest.mark.parametrize("s", [0.3, 1.0, 0.0, float("nan"), 7.5])
def test_scale_rounds_once_per_dtype_and_skips_one(s):
    grads = scale_grads()
    grads[3][2] = float("nan")
    storages = [g._base if g._base is not None else g for g in grads]
    before = [bits(st).clone() for st in storages]
    want = [(g.float() * s).to(g.dtype) for g in grads]  # torch: fp32 product, one rounding
    Clip(grads, 1000).scale(t_([s]))
    for g, w, st, b in zip(grads, want, storages, before):
        if s == 1.0:
            assert torch.equal(bits(st), b), "a factor of 1 leaves the memory untouched"
        else:
            same_values(g, w, f"x * {s}")
            assert torch.equal(bits(st)[: st.numel() - g.numel()], b[: st.numel() - g.numel()]), "outside the view"


def test_zero_if_scale_is_zero_writes_zeros_over_nan():
    grads = scale_grads()
    grads[0][5] = float("nan")
    grads[1][0] = float("inf")
    clip = Clip(grads, 1000)
    clip.scale(t_([0.0]), zero_if_scale_is_zero=True)
    for g in grads:
        assert_bitwise_equal(g, torch.zeros_like(g), "zeros (+0.0), NaN * 0 would be NaN")


def test_per_tensor_factors_from_the_reduce():
    """Layer-wise clipping: reduce writes each tensor's factor, scale reads it; factors of 1 skip."""
    grads = [randn(3000, scale=10, seed=21), randn(2000, torch.bfloat16, scale=1e-3, seed=22),
             view(1500, 1, torch.float16, scale=0.1, seed=23), torch.empty(0, device=DEVICE)]  # fmt: skip
    grads[1][3] = float("nan")  # found_inf: the policy decides every factor
    clip = Clip(grads[:1] + grads[2:], 700)  # no NaN: per-tensor factors
    out = clip.reduce(L2, max_norm=20.0, write_scales=True)
    factors = clip.out["tensor_scales"].clone()
    ref = reference(grads[:1] + grads[2:], L2, max_norm=20.0)
    check(out, ref, L2, write_scales=True)
    assert factors[0] < 1 and factors[1] == 1.0, "one tensor clipped, one left alone"
    before = [g.clone() for g in grads]
    clip.scale(factors, per_tensor=True)
    assert_bitwise_equal(grads[0], (before[0] * factors[0]).to(grads[0].dtype), "clipped")
    assert_bitwise_equal(grads[2], before[2], "factor 1: untouched")

    clip = Clip(grads, 700)
    for policy, fill in ((SKIP, 1.0), (ZERO, 0.0)):
        out = clip.reduce(L2, max_norm=20.0, policy=policy, write_scales=True)
        assert out["tensor_scales"].tolist() == [fill] * 4, f"policy {policy} overrides every factor"
    before = [g.clone() for g in grads]
    clip.scale(clip.out["tensor_scales"], per_tensor=True, zero_if_scale_is_zero=True)
    for g in grads:
        assert_bitwise_equal(g, torch.zeros_like(g), "POLICY_ZERO: zeros")


# ---- argument checks ----------------------------------------------------------------------------
BAD_REDUCE = [
    ("norm_kind", 9), ("policy", 3), ("flags", 4), ("chunk_size", 0), ("num_chunks", -1),
    ("result", 0), ("tensor_norms", 0), ("tensor_partials", 0), ("tensor_max_abs", 0), ("tensor_counts", 0),
    ("chunk_partials", 0), ("chunk_max_abs", 0), ("chunk_counts", 0), ("ticket", 0), ("addrs", 0),
    ("chunk_size", (1 << 30) + 1), ("num_tensors", 0),  # the limits every backend checks
]  # fmt: skip


@pytest.mark.parametrize("field,value", BAD_REDUCE, ids=[f for f, _ in BAD_REDUCE])
def test_reduce_names_a_bad_field_before_touching_memory(field, value):
    clip = Clip([randn(100, seed=24)], 64)
    clip.desc.norm_kind, clip.desc.p, clip.desc.policy, clip.desc.flags = L2, 2.0, PROPAGATE, 0
    setattr(clip.desc, field, value)
    with pytest.raises(ValueError, match=field):
        tk.reduce(clip.desc, DEVICE)
    assert bool((clip.out["result"] == SENTINEL).all()) and int(clip.workspace["ticket"]) == 0


@pytest.mark.parametrize("p", [0.0, math.inf, math.nan])
def test_norm_p_needs_a_finite_nonzero_p(p):
    clip = Clip([randn(10)], 64)
    clip.desc.norm_kind, clip.desc.p = P, p
    with pytest.raises(ValueError, match="NORM_P"):
        tk.reduce(clip.desc, DEVICE)


def test_flag_fields_need_their_buffers():
    grads = [randn(100, seed=25)]
    clip = Clip(grads, 64)
    clip.desc.tensor_scales = 0
    clip.desc.norm_kind, clip.desc.policy, clip.desc.flags = L2, PROPAGATE, _abi.FLAG_WRITE_TENSOR_SCALES
    with pytest.raises(ValueError, match="tensor_scales"):
        tk.reduce(clip.desc, DEVICE)
    before = grads[0].clone()
    clip.desc.flags, clip.desc.scale_ptr = _abi.FLAG_READ_TENSOR_SCALES, t_([0.5]).data_ptr()
    with pytest.raises(ValueError, match="tensor_scales"):
        tk.scale(clip.desc, DEVICE)
    clip.desc.flags, clip.desc.scale_ptr = 0, 0
    with pytest.raises(ValueError, match="scale_ptr"):
        tk.scale(clip.desc, DEVICE)
    assert_bitwise_equal(grads[0], before, "gradients untouched")


@pytest.mark.parametrize("field,value", [("chunk_size", 0), ("chunk_size", (1 << 30) + 1), ("num_tensors", 0)])
def test_scale_refuses_the_plan_fields_the_reduce_refuses(field, value):
    grads = [randn(100, seed=26)]
    before = grads[0].clone()
    clip = Clip(grads, 64)
    setattr(clip.desc, field, value)
    with pytest.raises(ValueError, match=field):
        clip.scale(t_([0.5]))
    assert_bitwise_equal(grads[0], before, "gradients untouched")


# ---- table entries the kernels cannot read (the host does not check device tables) ---------------
# (table, index, value): tensor 1's dtype; chunk 2, tensor 1's first chunk of 64 elements.
UNREADABLE = [("dtypes", 1, 7), ("chunk_start", 2, -5), ("chunk_start", 2, 10**6), ("chunk_tensor", 2, 9)]


@pytest.mark.parametrize("table,index,value", UNREADABLE, ids=[f"{t}={v}" for t, _, v in UNREADABLE])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_an_unreadable_chunk_is_one_nan_and_never_scaled(table, index, value, per_tensor):
    """As the CUDA kernels: the reduce reports the chunk as one NaN element (found_inf, NaN
    total), the scale skips it, and no output outside [0, T) is written (outputs in wider buffers)."""
    grads = [randn(100, seed=27), randn(300, seed=28)]
    clip = Clip(grads, 64)  # tensor 0: chunks 0-1; tensor 1: chunks 2-6
    spare = {name: torch.full((32,), -7, dtype=buf.dtype, device=DEVICE) for name, buf in clip.out.items() if name != "result"}
    for name, buf in spare.items():
        setattr(clip.desc, name, buf.data_ptr())
    clip.tables[table][index] = value
    out = clip.reduce(L2, max_norm=1.0, write_scales=per_tensor)
    r = out["result"]
    assert float(r[_abi.RESULT_FOUND_INF]) == 1.0 and math.isnan(float(r[_abi.RESULT_TOTAL]))
    counts = spare["tensor_counts"].cpu()
    assert int(counts[4:].ne(-7).sum()) == 0 and all(int(b[2:].ne(-7).sum()) == 0 for b in spare.values() if b is not spare["tensor_counts"])
    nans = counts[:4].tolist()
    assert nans == {"dtypes": [0, 0, 5, 0], "chunk_start": [0, 0, 1, 0], "chunk_tensor": [0, 0, 0, 0]}[table], nans
    before = [g.clone() for g in grads]
    factors = t_([0.5, 0.25])
    clip.scale(factors if per_tensor else t_([0.5]), per_tensor=per_tensor)
    f1 = 0.25 if per_tensor else 0.5
    assert_bitwise_equal(grads[0], before[0] * 0.5, "tensor 0 scaled")
    want = before[1] * f1
    if table == "dtypes":
        want = before[1]
    else:
        want[:64] = before[1][:64]  # chunk 2: skipped
    assert_bitwise_equal(grads[1], want, "tensor 1: the unreadable chunk untouched")


def test_wrong_device_is_refused():
    clip = Clip([randn(10)], 64)
    other = torch.device("cuda" if DEVICE.type == "cpu" else "cpu")
    with pytest.raises(RuntimeError, match="tensors"):
        tk.reduce(clip.desc, other)


# ---- the GPU build, compiled here ---------------------------------------------------------------
def test_the_gpu_build_compiles_for_sm90():
    """The non-interpreted path, compiled by this Triton for sm_90 with the launchers' own options
    (ptxas ships with triton; no GPU is needed): every norm kind, each constexpr flag both ways
    (half the variants: ~45 s on 2 cores with a cold cache)."""
    pytest.importorskip("triton.backends.nvidia")
    script = textwrap.dedent(
        """
        import inspect
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import _normalize_ty
        from gradfuse import _abi
        from gradfuse.triton_kernels import multi_tensor_norm as N, multi_tensor_scale as S

        def build(kernel, config):
            params = inspect.signature(kernel.fn).parameters
            sig = {n: "constexpr" if n in config else _normalize_ty(p.annotation) for n, p in params.items()}
            consts = {n: v for n, v in config.items() if n in params}
            options = {n: v for n, v in config.items() if n not in params}
            triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)

        for i, kind in enumerate(N.NORM_KINDS):
            build(N._reduce_kernel, N.config(kind, write_scales=i % 2 == 0))
        for flags in ((False, False), (True, True)):
            build(S._scale_kernel, S.config(*flags))
        print("compiled")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the launchers set enable_fp_fusion themselves
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]


def test_kernel_pointer_arguments_are_typed_addresses():
    """Every non-constexpr parameter is an annotated int64 address / scalar or an fp64 double."""
    for kernel in (tk.multi_tensor_norm._reduce_kernel, tk.multi_tensor_scale._scale_kernel):
        fn = getattr(kernel, "kernel", kernel).fn  # the interpreter's launcher wraps the kernel
        for name, param in inspect.signature(fn).parameters.items():
            assert param.annotation in ("tl.int64", "tl.float64", "tl.constexpr"), (name, param.annotation)
