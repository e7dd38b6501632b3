"""gradfuse's drop-in functions against the real ``torch.nn.utils`` (torch's checklist, item by item),
on every backend that runs on CPU tensors here; and gradfuse's deliberate deviations from torch.

Each comparison runs torch and gradfuse on independent copies of the same gradients. Where torch is
numerically wrong (fp16/bf16 overflow and double rounding) the check is against an fp64 reference.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.utils as tnu
from helpers import (
    HALF_ULP,
    PARITY_RTOL,
    assert_bitwise_equal,
    assert_close_rel,
    assert_scaled,
    assert_unchanged,
    needs_numel,
    param_with_grad,
    params_from,
    parity_rtol,
    real_dtype,
    ref_coef,
    ref_norms,
    small,
    snapshot,
    subnormal_step,
    twin_params,
)

import gradfuse

INF = math.inf
NORM_TYPES = [2.0, 1.0, 3.5, INF, -INF, 0.5, -1.0, 0.0]
NONFINITE_MSG = (
    "The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be clipped. "
    "To disable this error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
)


def grads_of(params):
    return [p.grad for p in params if p.grad is not None]


def gen(seed: int, shapes, dtype=torch.float32, scale: float = 1.0, nonzero: bool = True) -> list[torch.Tensor]:
    """Reproducible random gradients (no exact zeros unless asked: -inf / negative norms)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if nonzero:
            x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)
        out.append(x.to(dtype))
    return out


def norm_rtol(dtype: torch.dtype, grads=()) -> float:
    """gradfuse's returned norm vs the fp64 reference: fp32 accumulation (unless every gradient is
    fp64) plus one rounding to the returned dtype."""
    acc = 1e-12 if all(real_dtype(g.dtype) == torch.float64 for g in grads) else 2e-6
    return acc + HALF_ULP[dtype] * (1 + 1e-3)


def compare_with_torch(grads, max_norm, norm_type=2.0, *, backend, error_if_nonfinite=False, foreach=None, check_ref=True):
    """clip_grad_norm_ by torch and by gradfuse on copies of ``grads``; compares the returned norm
    (dtype, device, shape, value) and the clipped gradients. Returns (torch params, gradfuse params,
    torch norm, gradfuse norm)."""
    tp, gp = twin_params(grads)
    before = [g.detach().clone() for g in grads]
    t_norm = tnu.clip_grad_norm_(tp, max_norm, norm_type, error_if_nonfinite, foreach)
    g_norm = gradfuse.clip_grad_norm_(gp, max_norm, norm_type, error_if_nonfinite, foreach, backend=backend)

    assert isinstance(g_norm, torch.Tensor)
    assert g_norm.dtype == t_norm.dtype, (g_norm.dtype, t_norm.dtype)
    assert g_norm.device == t_norm.device
    assert g_norm.shape == t_norm.shape == torch.Size([])
    assert not g_norm.requires_grad
    dtype = t_norm.dtype
    got, want_t = float(g_norm), float(t_norm)
    total, _ = ref_norms(before, norm_type)
    want = float(torch.tensor(total, dtype=torch.float64).to(dtype))  # the correctly rounded fp64 norm
    sub = subnormal_step(dtype)
    tol = max(PARITY_RTOL[dtype], parity_rtol(grads))
    # Where torch is numerically wrong (fp16/bf16 partial norms that overflow, or double rounding
    # into the subnormals) the fp64 reference decides, and torch's gradients are not compared.
    torch_wrong = any(real_dtype(g.dtype) in (torch.float16, torch.bfloat16) for g in grads) and not (
        (math.isnan(want) and math.isnan(want_t)) or want_t == want or abs(want_t - want) <= tol * abs(want) + 2 * sub
    )
    if not torch_wrong:
        assert_close_rel(got, want_t, tol, "norm vs torch", atol=2 * sub)
    if check_ref or torch_wrong:
        assert_close_rel(got, want, norm_rtol(dtype, grads), "norm vs fp64 reference", atol=sub)
        coef = ref_coef(total, max_norm)
        coef_rtol = 1e-12 if all(real_dtype(g.dtype) == torch.float64 for g in grads) else 3e-6
        for i, (g, b) in enumerate(zip(grads_of(gp), before)):
            assert_scaled(g, b, coef, ulps=1.0, rtol=coef_rtol, msg=f"gradient {i}")
    for i, (a, b) in enumerate(zip(grads_of(gp), grads_of(tp))):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        if torch_wrong:
            continue
        # torch's coefficient carries its total's error (fp16/bf16 double rounding in mixed lists)
        rtol = max({torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[real_dtype(b.dtype)], 2 * parity_rtol(grads))
        atol = subnormal_step(b.dtype)  # results in the subnormals differ by one step
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, i=i: f"gradient {i} vs torch: {m}")
    return tp, gp, t_norm, g_norm


# ------------------------------------------------------------------------------------------------
# Input forms


class TestInputForms:
    def test_single_tensor(self, backend):
        (g,) = gen(0, [(5, 7)])
        tp, gp = twin_params([g])
        t = tnu.clip_grad_norm_(tp[0], 0.5)
        r = gradfuse.clip_grad_norm_(gp[0], 0.5, backend=backend)
        assert_close_rel(float(r), float(t), 2e-6)
        torch.testing.assert_close(gp[0].grad, tp[0].grad, rtol=4e-6, atol=0)
        assert float(torch.linalg.vector_norm(gp[0].grad.double())) == pytest.approx(0.5, rel=1e-5)

    @pytest.mark.parametrize("form", ["list", "tuple", "generator", "parameters()", "dict_values"])
    def test_iterables(self, backend, form):
        grads = gen(1, [(3, 4), (6,), (2, 2, 2)])
        tp, gp = twin_params(grads)

        def wrap(ps):
            if form == "list":
                return list(ps)
            if form == "tuple":
                return tuple(ps)
            if form == "generator":
                return (p for p in ps)
            if form == "dict_values":
                return {i: p for i, p in enumerate(ps)}.values()
            m = torch.nn.Module()
            for i, p in enumerate(ps):
                m.register_parameter(f"p{i}", p)
            return m.parameters()

        t = tnu.clip_grad_norm_(wrap(tp), 1.0)
        r = gradfuse.clip_grad_norm_(wrap(gp), 1.0, backend=backend)
        assert_close_rel(float(r), float(t), 2e-6)
        for a, b in zip(gp, tp):
            torch.testing.assert_close(a.grad, b.grad, rtol=4e-6, atol=0)
        assert float(r) > 1.0  # the generator was read once, and not exhausted before the norm

    def test_get_total_norm_generator(self, backend):
        grads = gen(2, [(4,), (9,)])
        t = tnu.get_total_norm(g for g in grads)
        r = gradfuse.get_total_norm((g for g in grads), backend=backend)
        assert_close_rel(float(r), float(t), 2e-6)

    def test_empty_generator_warns_like_torch(self, backend):
        msg = "`parameters` is an empty generator, no gradient clipping will occur."
        with pytest.warns(UserWarning, match=re.escape(msg)) as t_rec:
            t = tnu.clip_grad_norm_((p for p in []), 1.0)
        with pytest.warns(UserWarning, match=re.escape(msg)) as g_rec:
            r = gradfuse.clip_grad_norm_((p for p in []), 1.0, backend=backend)
        assert [str(w.message) for w in g_rec] == [str(w.message) for w in t_rec] == [msg]
        # stacklevel: both point at the caller (this file), not at the library
        assert g_rec[0].filename == t_rec[0].filename == __file__
        assert_bitwise_equal(r, t)

    def test_empty_list_no_warning(self, backend):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = gradfuse.clip_grad_norm_([], 1.0, backend=backend)
            t = tnu.clip_grad_norm_([], 1.0)
            assert gradfuse.get_total_norm([], backend=backend).item() == 0.0
            assert gradfuse.clip_grads_with_norm_([], 1.0, torch.tensor(1.0), backend=backend) is None
            assert gradfuse.clip_grads([], 1.0, backend=backend) is None
        assert_bitwise_equal(r, t)

    def test_non_generator_empty_iterables_do_not_warn(self, backend):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gradfuse.clip_grad_norm_((), 1.0, backend=backend)
            gradfuse.clip_grad_norm_(iter([]), 1.0, backend=backend)  # an iterator, not a generator: torch is silent too
            tnu.clip_grad_norm_(iter([]), 1.0)


class TestNoGrads:
    def test_none_grads_are_skipped(self, backend):
        grads = gen(3, [(4, 4), (7,)])
        tp, gp = twin_params(grads)
        for ps in (tp, gp):
            ps.insert(1, torch.nn.Parameter(torch.ones(3)))  # grad None
            ps.append(torch.nn.Parameter(torch.ones(2, 2)))
        t = tnu.clip_grad_norm_(tp, 0.1)
        r = gradfuse.clip_grad_norm_(gp, 0.1, backend=backend)
        assert_close_rel(float(r), float(t), 2e-6)
        assert gp[1].grad is None and gp[3].grad is None
        total, _ = ref_norms(grads, 2.0)
        assert_close_rel(float(r), total, 2e-6)
        torch.testing.assert_close(gp[0].grad, tp[0].grad, rtol=4e-6, atol=0)
        torch.testing.assert_close(gp[2].grad, tp[2].grad, rtol=4e-6, atol=0)

    @pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm"])
    def test_no_grads_returns_zero_like_torch(self, backend, fn):
        params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.float16))]
        if fn == "clip_grad_norm_":
            r = gradfuse.clip_grad_norm_(params, 1.0, backend=backend)
            t = tnu.clip_grad_norm_(params, 1.0)
        else:
            r = gradfuse.get_total_norm([], backend=backend)
            t = tnu.get_total_norm([])
        assert_bitwise_equal(r, t)
        assert r.dtype == torch.get_default_dtype() == torch.float32
        assert r.device == torch.device("cpu") and r.shape == torch.Size([])
        assert not r.requires_grad

    def test_no_grads_default_dtype(self, backend):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            r = gradfuse.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0, backend=backend)
            t = tnu.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)
        finally:
            torch.set_default_dtype(old)
        assert r.dtype == t.dtype == torch.float64
        assert float(r) == 0.0

    def test_no_grads_default_device_not_params_device(self, backend):
        meta_param = torch.nn.Parameter(torch.empty(3, device="meta"))  # no grad
        r = gradfuse.clip_grad_norm_([meta_param], 1.0, backend=backend)
        t = tnu.clip_grad_norm_([meta_param], 1.0)
        assert r.device == t.device == torch.device("cpu")
        with torch.device("meta"):
            r = gradfuse.clip_grad_norm_([], 1.0, backend=backend)
            t = tnu.clip_grad_norm_([], 1.0)
        assert r.device == t.device == torch.device("meta")
        assert r.dtype == t.dtype


class TestArguments:
    @pytest.mark.parametrize(
        "max_norm,norm_type",
        [("inf", 2.0), (1.0, "inf"), ("0.25", "2"), ("1e-2", "-inf"), (0, 2.0), (torch.tensor(0.5), 2.0), (1.0, torch.tensor(1.0)), (2, 1)],
    )
    def test_str_and_other_numbers(self, backend, max_norm, norm_type):
        grads = gen(4, [(3, 5), (8,)])
        compare_with_torch(grads, max_norm, norm_type, backend=backend, check_ref=False)

    def test_max_norm_inf_leaves_grads_bitwise(self, backend):
        grads = gen(5, [(6, 6), (3,)])
        tp, gp, _, r = compare_with_torch(grads, "inf", backend=backend)
        assert_unchanged(grads_of(gp), snapshot(grads))

    def test_max_norm_zero_zeroes(self, backend):
        grads = gen(6, [(6, 6), (3,)])
        _, gp, _, _ = compare_with_torch(grads, 0.0, backend=backend)
        for g in grads_of(gp):
            assert not bool(g.any())


# ------------------------------------------------------------------------------------------------
# Norm types and dtypes


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
class TestNormTypes:
    def test_clip_matches_torch(self, backend, norm_type, dtype):
        grads = gen(10, [(7, 9), (1,), (130,), (4, 1, 3)], dtype=dtype)
        total, _ = ref_norms(grads, norm_type)
        for max_norm in (total * 0.3, total * 2.0):
            compare_with_torch(grads, max_norm, norm_type, backend=backend)

    def test_with_zeros(self, backend, norm_type, dtype):
        # an all-zero tensor and tensors with zero elements: -inf / negative norms give 0, p=0 counts
        grads = gen(11, [(5, 5), (8,)], dtype=dtype, nonzero=False)
        grads[1][::3] = 0
        grads.insert(1, torch.zeros(6, dtype=dtype))
        tp, gp, t, r = compare_with_torch(grads, 0.5, norm_type, backend=backend)
        if norm_type == 0.0:
            assert float(r) == 2.0  # tensors with any non-zero, not the count of non-zero elements
        if norm_type in (-INF, -1.0):
            assert float(r) == 0.0

    def test_get_total_norm(self, backend, norm_type, dtype):
        grads = gen(12, [(33,), (2, 17)], dtype=dtype)
        t = tnu.get_total_norm(grads, norm_type)
        r = gradfuse.get_total_norm(grads, norm_type, backend=backend)
        assert r.dtype == t.dtype and r.shape == t.shape and r.device == t.device
        assert_close_rel(float(r), float(t), PARITY_RTOL[dtype])
        total, _ = ref_norms(grads, norm_type)
        assert_close_rel(float(r), float(torch.tensor(total, dtype=torch.float64).to(dtype)), norm_rtol(dtype, grads))

    def test_get_total_norm_then_clip_grads_with_norm(self, backend, norm_type, dtype):
        grads = gen(13, [(10, 3), (5,)], dtype=dtype)
        tp, gp = twin_params(grads)
        t = tnu.get_total_norm(grads_of(tp), norm_type)
        r = gradfuse.get_total_norm(grads_of(gp), norm_type, backend=backend)
        tnu.clip_grads_with_norm_(tp, 0.1, t)
        assert gradfuse.clip_grads_with_norm_(gp, 0.1, r, backend=backend) is None
        total, _ = ref_norms(grads, norm_type)
        coef = ref_coef(float(r), 0.1)  # clip_grads_with_norm_ uses the norm it is given
        for g, b in zip(grads_of(gp), grads):
            assert_scaled(g, b, coef, ulps=1.0, rtol=1e-7 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize(
    "dtypes,want",
    [
        ((torch.float32,), torch.float32),
        ((torch.float16,), torch.float16),
        ((torch.bfloat16,), torch.bfloat16),
        ((torch.float64,), torch.float64),
        ((torch.float16, torch.float32), torch.float32),
        ((torch.bfloat16, torch.float16), torch.float32),
        ((torch.bfloat16, torch.float32, torch.float16), torch.float32),
        ((torch.float32, torch.float64), torch.float64),
        ((torch.float16, torch.float16), torch.float16),
    ],
    ids=lambda x: "+".join(str(d).removeprefix("torch.") for d in x) if isinstance(x, tuple) else str(x),
)
def test_return_dtype(backend, dtypes, want):
    grads = [gen(20 + i, [(11,)], dtype=d)[0] for i, d in enumerate(dtypes)]
    _, _, t, r = compare_with_torch(grads, 1.0, backend=backend)
    assert r.dtype == t.dtype == want
    r2 = gradfuse.get_total_norm(grads, backend=backend)
    assert r2.dtype == want


@pytest.mark.parametrize("cdtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.5])
def test_complex_grads(backend, cdtype, norm_type):
    g = torch.Generator().manual_seed(30)
    grads = [torch.randn(5, 3, dtype=cdtype, generator=g), torch.randn(4, dtype=cdtype, generator=g)]
    _, gp, t, r = compare_with_torch(grads, 0.5, norm_type, backend=backend)
    assert r.dtype == t.dtype == (torch.float32 if cdtype == torch.complex64 else torch.float64)
    assert all(p.grad.dtype == cdtype for p in gp)


def test_complex_mixed_with_real(backend):
    g = torch.Generator().manual_seed(31)
    grads = [torch.randn(6, dtype=torch.complex64, generator=g), torch.randn(5, generator=g)]
    _, _, t, r = compare_with_torch(grads, 0.5, backend=backend)
    assert r.dtype == torch.float32


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 0.0])
def test_duplicate_params_counted_and_scaled_twice(backend, norm_type):
    grads = gen(40, [(4, 4), (9,)])
    tp, gp = twin_params(grads)
    t = tnu.clip_grad_norm_([tp[0], tp[1], tp[0]], 0.5, norm_type)
    r = gradfuse.clip_grad_norm_([gp[0], gp[1], gp[0]], 0.5, norm_type, backend=backend)
    assert_close_rel(float(r), float(t), 2e-6)
    total, _ = ref_norms([grads[0], grads[1], grads[0]], norm_type)
    assert_close_rel(float(r), total, 2e-6)
    coef = ref_coef(total, 0.5)
    assert coef < 1
    assert_scaled(gp[0].grad, grads[0], coef * coef, ulps=2, rtol=6e-6, msg="duplicate scaled twice")
    assert_scaled(gp[1].grad, grads[1], coef, ulps=1, rtol=3e-6)
    torch.testing.assert_close(gp[0].grad, tp[0].grad, rtol=4e-6, atol=0)


def test_views_of_one_flat_buffer(backend):
    """Gradients that are disjoint views of one flat buffer (DDP bucket views, flat params)."""
    (buf_t,) = gen(41, [(1000,)])
    buf_g = buf_t.clone()
    shapes, offsets = [(10, 10), (3,), (25, 4), (1,), (500,)], [0, 100, 103, 203, 204]

    def views(buf):
        return [buf[o : o + math.prod(s)].view(s) for s, o in zip(shapes, offsets)]

    tp, gp = params_from(views(buf_t)), params_from(views(buf_g))
    t = tnu.clip_grad_norm_(tp, 1.0)
    r = gradfuse.clip_grad_norm_(gp, 1.0, backend=backend)
    assert_close_rel(float(r), float(t), 2e-6)
    torch.testing.assert_close(buf_g, buf_t, rtol=4e-6, atol=0)
    assert_unchanged([buf_g[704:]], snapshot([buf_t[704:]]), "memory outside the views was written")


# ------------------------------------------------------------------------------------------------
# Zero-size tensors


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.5, 0.0, 3.5])
def test_zero_size_ok(backend, norm_type):
    grads = [torch.empty(0), gen(50, [(6,)])[0], torch.empty(3, 0), torch.empty(0, dtype=torch.float16)]
    compare_with_torch(grads, 0.5, norm_type, backend=backend)
    only_empty = [torch.empty(0), torch.empty(0, 4)]
    _, _, t, r = compare_with_torch(only_empty, 0.5, norm_type, backend=backend)
    assert float(r) == 0.0


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_type", [INF, -INF, -1.0, -0.5])
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm"])
def test_zero_size_raises_torch_text(backend, norm_type, foreach, fn):
    grads = [gen(51, [(6,)])[0], torch.empty(0)]
    tp, gp = twin_params(grads)
    snap = snapshot(grads)
    with pytest.raises(RuntimeError) as t_err:
        if fn == "clip_grad_norm_":
            tnu.clip_grad_norm_(tp, 0.1, norm_type, foreach=foreach)
        else:
            tnu.get_total_norm(grads_of(tp), norm_type, foreach=foreach)
    with pytest.raises(RuntimeError) as g_err:
        if fn == "clip_grad_norm_":
            gradfuse.clip_grad_norm_(gp, 0.1, norm_type, foreach=foreach, backend=backend)
        else:
            gradfuse.get_total_norm(grads_of(gp), norm_type, foreach=foreach, backend=backend)
    assert str(g_err.value) == str(t_err.value)
    assert "on an empty tensor because the operation does not have an identity" in str(g_err.value)
    assert_unchanged(grads_of(gp), snap)


# ------------------------------------------------------------------------------------------------
# Layouts


def _layouts(dtype):
    g = torch.Generator().manual_seed(60)
    base = torch.randn(12, 10, generator=g).to(dtype)
    buf = torch.randn(301, generator=g).to(dtype)
    cl = torch.randn(2, 3, 4, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return {
        "transposed": base.t(),
        "sliced_gaps": base[:, 1:7],
        "step2": buf[::2],
        "misaligned_offset1": buf[1:],
        "misaligned_offset3": buf[3:],
        "channels_last": cl,
        "permuted_3d": torch.randn(3, 4, 5, generator=g).to(dtype).permute(2, 0, 1),
        "column": base[:, 3],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(_layouts(torch.float32)))
def test_non_contiguous_and_misaligned(backend, dtype, layout):
    v = _layouts(dtype)[layout]
    extra = gen(61, [(17,)], dtype=dtype)[0]
    for max_norm in (0.5, 1e6):
        _, gp, _, _ = compare_with_torch([v, extra], max_norm, backend=backend)
        assert gp[0].grad.stride() == v.stride()


def test_non_contiguous_grad_in_place(backend):
    """The clipped gradient is the same tensor object, scaled in place, and the gaps untouched."""
    buf = gen(62, [(40,)])[0]
    view = buf[::3]
    p = param_with_grad(view)
    gaps = [buf[1::3].clone(), buf[2::3].clone()]
    gradfuse.clip_grad_norm_([p], 0.1, backend=backend)
    assert p.grad is view
    assert_bitwise_equal(buf[1::3], gaps[0])
    assert_bitwise_equal(buf[2::3], gaps[1])
    assert float(torch.linalg.vector_norm(view.double())) == pytest.approx(0.1, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Autograd


def test_grads_with_grad_fn_keep_it(backend):
    def make():
        torch.manual_seed(70)
        m = torch.nn.Linear(5, 3)
        x = torch.randn(4, 5)
        (m(x).tanh() ** 2).sum().backward(create_graph=True)
        return list(m.parameters())

    tp, gp = make(), make()
    assert all(p.grad.grad_fn is not None for p in gp)
    t = tnu.clip_grad_norm_(tp, 0.1)
    r = gradfuse.clip_grad_norm_(gp, 0.1, backend=backend)
    assert not r.requires_grad and r.grad_fn is None
    assert_close_rel(float(r), float(t), 2e-6)
    for a, b in zip(gp, tp):
        assert a.grad.requires_grad and a.grad.grad_fn is not None
        torch.testing.assert_close(a.grad.detach(), b.grad.detach(), rtol=4e-6, atol=0)


def test_returned_norm_does_not_require_grad(backend):
    grads = gen(71, [(4,)])
    p = params_from(grads)
    with torch.enable_grad():
        r = gradfuse.clip_grad_norm_(p, 1.0, backend=backend)
        r2 = gradfuse.get_total_norm(grads, backend=backend)
    assert not r.requires_grad and not r2.requires_grad


def test_functions_keep_their_names_and_docs():
    for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_", "clip_grads"):
        fn = getattr(gradfuse, name)
        assert fn.__name__ == name
        assert fn.__doc__ and fn.__wrapped__ is not None


def test_grad_mode_restored(backend):
    grads = gen(72, [(4,)])
    with torch.enable_grad():
        gradfuse.clip_grad_norm_(params_from(grads), 1.0, backend=backend)
        assert torch.is_grad_enabled()
    with torch.no_grad():
        gradfuse.clip_grad_norm_(params_from(grads), 1.0, backend=backend)
        assert not torch.is_grad_enabled()


# ------------------------------------------------------------------------------------------------
# foreach


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_flag_cpu(backend, foreach):
    grads = gen(80, [(8, 8), (3,)]) + gen(81, [(5,)], dtype=torch.float16)
    compare_with_torch(grads, 0.5, backend=backend, foreach=foreach)


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"])
def test_foreach_true_on_meta_raises_torch_text(backend_name, fn):
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    msg = "foreach=True was passed, but can't use the foreach API on meta tensors"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        if fn == "clip_grad_norm_":
            tnu.clip_grad_norm_([p], 1.0, foreach=True)
        elif fn == "get_total_norm":
            tnu.get_total_norm([p.grad], foreach=True)
        else:
            tnu.clip_grads_with_norm_([p], 1.0, torch.tensor(2.0, device="meta"), foreach=True)
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        if fn == "clip_grad_norm_":
            gradfuse.clip_grad_norm_([p], 1.0, foreach=True, backend=backend_name)
        elif fn == "get_total_norm":
            gradfuse.get_total_norm([p.grad], foreach=True, backend=backend_name)
        else:
            gradfuse.clip_grads_with_norm_([p], 1.0, torch.tensor(2.0, device="meta"), foreach=True, backend=backend_name)


@pytest.mark.parametrize("foreach", [None, False])
def test_meta_tensors_like_torch(foreach):
    p = torch.nn.Parameter(torch.empty(3, 2, device="meta", dtype=torch.float16))
    p.grad = torch.empty(3, 2, device="meta", dtype=torch.float16)
    t = tnu.clip_grad_norm_([p], 1.0, foreach=foreach)
    r = gradfuse.clip_grad_norm_([p], 1.0, foreach=foreach)
    assert r.device == t.device == torch.device("meta")
    assert r.dtype == t.dtype and r.shape == t.shape


# ------------------------------------------------------------------------------------------------
# clip_grad_value_ and the deprecated alias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_matches_torch(dtype, foreach):
    grads = gen(90, [(7, 5), (13,)], dtype=dtype, scale=3.0)
    grads.append(grads[0].t().clone())  # transposed strides (clone keeps them)
    grads.append(torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=dtype))
    tp, gp = twin_params(grads)
    for ps in (tp, gp):
        ps.append(torch.nn.Parameter(torch.ones(2)))  # grad None
    tnu.clip_grad_value_(tp, 1.5, foreach=foreach)
    assert gradfuse.clip_grad_value_((p for p in gp), "1.5", foreach=foreach) is None
    for a, b in zip(grads_of(gp), grads_of(tp)):
        assert_bitwise_equal(a, b)
    assert gp[-1].grad is None


def test_clip_grad_value_single_tensor():
    (g,) = gen(91, [(10,)], scale=5.0)
    tp, gp = twin_params([g])
    tnu.clip_grad_value_(tp[0], 0.5)
    gradfuse.clip_grad_value_(gp[0], 0.5)
    assert_bitwise_equal(gp[0].grad, tp[0].grad)


@pytest.mark.parametrize("params", [[], "none"], ids=["empty", "all-None"])
def test_clip_grad_value_empty_error(params):
    if params == "none":
        params = [torch.nn.Parameter(torch.ones(2))]
    msg = "Expected !nested_tensorlist[0].empty() to be true, but got false."
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        tnu.clip_grad_value_(params, 1.0)
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        gradfuse.clip_grad_value_(params, 1.0)


def test_deprecated_clip_grad_norm(backend):
    grads = gen(92, [(6, 2)])
    tp, gp = twin_params(grads)
    with pytest.warns(FutureWarning, match="torch.nn.utils.clip_grad_norm` is now deprecated"):
        t = tnu.clip_grad_norm(tp, 0.2)
    with pytest.warns(FutureWarning, match=re.escape("`gradfuse.clip_grad_norm` is deprecated in favor of `gradfuse.clip_grad_norm_`")) as g_rec:
        r = gradfuse.clip_grad_norm(gp, 0.2, backend=backend)
    assert g_rec[0].filename == __file__  # the warning points at the caller, as torch's does
    assert_close_rel(float(r), float(t), 2e-6)
    torch.testing.assert_close(gp[0].grad, tp[0].grad, rtol=4e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Non-finite gradients


def _with_bad(value: float, dtype=torch.float32, where=(1, 4)) -> list[torch.Tensor]:
    grads = gen(100, [(3, 4), (9,), (5,)], dtype=dtype)
    grads[where[0]].view(-1)[where[1]] = value
    return grads


@pytest.mark.parametrize("bad", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, -INF, 0.0, 3.5, -1.0, 0.5], ids=lambda p: f"p={p}")
def test_error_if_nonfinite_like_torch(backend, bad, norm_type):
    """Raises exactly when torch raises (e.g. -inf norm with a NaN: yes; p=0: never), with torch's
    text, before any gradient is touched; otherwise clips like torch."""
    grads = _with_bad(bad)
    tp, gp = twin_params(grads)
    snap = snapshot(grads)
    try:
        t = tnu.clip_grad_norm_(tp, 0.5, norm_type, error_if_nonfinite=True)
        t_err = None
    except RuntimeError as e:
        t_err = e
    if t_err is not None:
        with pytest.raises(RuntimeError) as g_err:
            gradfuse.clip_grad_norm_(gp, 0.5, norm_type, error_if_nonfinite=True, backend=backend)
        assert str(g_err.value) == str(t_err) == NONFINITE_MSG.format(p=float(norm_type))
        assert_unchanged(grads_of(gp), snap, "a gradient was touched before the error")
        with pytest.raises(RuntimeError, match=re.escape(NONFINITE_MSG.format(p=float(norm_type)))):
            gradfuse.get_total_norm(grads, norm_type, error_if_nonfinite=True, backend=backend)
    else:
        r = gradfuse.clip_grad_norm_(gp, 0.5, norm_type, error_if_nonfinite=True, backend=backend)
        assert_close_rel(float(r), float(t), 2e-6)
        for a, b in zip(grads_of(gp), grads_of(tp)):
            torch.testing.assert_close(a, b, rtol=4e-6, atol=0, equal_nan=True)
    if norm_type in (0.0,):
        assert t_err is None
    if math.isnan(bad) or norm_type > 0:
        assert t_err is not None or norm_type == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_error_if_nonfinite_finite_grads_do_not_raise(backend, dtype):
    grads = gen(101, [(10,), (4, 4)], dtype=dtype)
    compare_with_torch(grads, 0.5, backend=backend, error_if_nonfinite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.5])
@pytest.mark.parametrize("where", [(0, 0), (1, 8), (2, 2)], ids=["first", "last-of-middle", "middle"])
def test_nan_makes_everything_nan(backend, dtype, norm_type, where):
    grads = _with_bad(math.nan, dtype, where)
    tp, gp, t, r = compare_with_torch(grads, 0.5, norm_type, backend=backend, check_ref=False)
    assert math.isnan(float(r))
    for g in grads_of(gp):
        assert bool(torch.isnan(g).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [INF, -INF], ids=["inf", "-inf"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
def test_inf_zeroes_finite_and_nans_the_inf(backend, dtype, bad, norm_type):
    grads = _with_bad(bad, dtype)
    tp, gp, t, r = compare_with_torch(grads, 0.5, norm_type, backend=backend, check_ref=False)
    assert float(r) == INF
    for i, g in enumerate(grads_of(gp)):
        nonfinite = ~torch.isfinite(grads[i])
        assert bool(torch.isnan(g[nonfinite]).all())
        assert bool((g[~nonfinite] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, -INF, 0.0])
def test_no_clip_leaves_grads_bitwise_unchanged(backend, dtype, norm_type):
    """coef == 1: every bit stays, including -0.0 and subnormals."""
    grads = gen(110, [(9, 7), (3,), (64,)], dtype=dtype, scale=1e-3)
    grads[1][0] = -0.0
    grads[1][1] = torch.finfo(dtype).tiny / 4  # subnormal
    grads[1][2] = -torch.finfo(dtype).tiny / 2
    snap = snapshot(grads)
    total, _ = ref_norms(grads, norm_type)
    for max_norm in (total * 1.5 + 1.0, INF, 1e30):
        ps = params_from(grads)
        r = gradfuse.clip_grad_norm_(ps, max_norm, norm_type, backend=backend)
        assert_unchanged(grads_of(ps), snap, f"max_norm={max_norm}")
        assert ps[0].grad is grads[0]
    t = tnu.clip_grad_norm_(params_from([g.clone() for g in grads]), INF, norm_type)
    assert r.dtype == t.dtype


def test_clip_grads_with_norm_no_clip_bitwise(backend):
    grads = gen(111, [(20,), (5, 5)], dtype=torch.float16)
    snap = snapshot(grads)
    gradfuse.clip_grads_with_norm_(params_from(grads), 10.0, torch.tensor(1.0), backend=backend)
    assert_unchanged(grads, snap)


@pytest.mark.parametrize("total_dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_clip_grads_with_norm_matches_torch(backend, total_dtype):
    grads = gen(112, [(20,), (5, 5)])
    tp, gp = twin_params(grads)
    total = torch.tensor(7.3, dtype=total_dtype)
    tnu.clip_grads_with_norm_(tp, 1.0, total)
    gradfuse.clip_grads_with_norm_(gp, 1.0, total, backend=backend)
    # the coefficient in fp32 (fp64 for an fp64 total); torch's is in total_norm's dtype
    coef = 1.0 / (float(total) + 1e-6)
    for a, b, g in zip(grads_of(gp), grads_of(tp), grads):
        assert_scaled(a, g, coef, ulps=2.0)
        if total_dtype != torch.float16:
            torch.testing.assert_close(a, b, rtol=2.5e-7, atol=0)
    # a NaN total norm propagates like torch's
    tp, gp = twin_params(grads)
    tnu.clip_grads_with_norm_(tp, 1.0, torch.tensor(math.nan))
    gradfuse.clip_grads_with_norm_(gp, 1.0, torch.tensor(math.nan), backend=backend)
    for a, b in zip(grads_of(gp), grads_of(tp)):
        assert bool(torch.isnan(a).all()) and bool(torch.isnan(b).all())


# ------------------------------------------------------------------------------------------------
# Deliberate deviations from torch (each listed in the README's table of deviations)


class TestDeviations:
    def test_fp16_norm_above_65504_clips_instead_of_zeroing(self, backend):
        n = small(10**6, backend)
        value = 1e5 / math.sqrt(n)  # 100 for 10^6 elements; the norm is 1e5 > 65504 either way
        grads = [torch.full((n,), value, dtype=torch.float16)]
        tp, gp = twin_params(grads)
        t = tnu.clip_grad_norm_(tp, 1.0)
        r = gradfuse.clip_grad_norm_(gp, 1.0, backend=backend)
        # torch: fp16 total overflows to inf, coef 0, finite grads zeroed
        assert float(t) == INF and not bool(tp[0].grad.any())
        # gradfuse: returns torch's dtype (fp16: inf) but clips with the fp32 norm
        assert r.dtype == torch.float16 and float(r) == INF
        g = gp[0].grad
        assert bool(torch.isfinite(g).all()) and bool(g.any())
        assert float(torch.linalg.vector_norm(g.double())) == pytest.approx(1.0, rel=2 * 2.0**-11)
        assert_scaled(g, grads[0], 1.0 / (1e5 + 1e-6), ulps=1.0)
        res = gradfuse.clip_grads(params_from([grads[0].clone()]), 1.0, backend=backend)
        assert_close_rel(float(res.total_norm), float(torch.linalg.vector_norm(grads[0].double())), 1e-6)
        assert res.total_norm.dtype == torch.float32 and float(res.found_inf) == 0.0

    def test_four_fp16_tensors_of_norm_60000(self, backend):
        grads = [torch.full((36,), 10000.0, dtype=torch.float16) for _ in range(4)]  # each norm 60000
        t = tnu.get_total_norm(grads)
        res = gradfuse.clip_grads(params_from([g.clone() for g in grads]), 1.0, backend=backend)
        assert float(t) == INF
        assert_close_rel(float(res.total_norm), 120000.0, 1e-6)
        assert_close_rel(float(res.tensor_norms[0]), 60000.0, 1e-6)

    def test_bf16_no_double_rounding(self, backend):
        ones = torch.ones(300, dtype=torch.bfloat16)
        res = gradfuse.clip_grads([param_with_grad(ones.clone())], 1.0, apply=False, backend=backend)
        assert_close_rel(float(res.total_norm), math.sqrt(300), 1e-6)  # 17.3205..., torch's bf16 path: 17.375
        assert_close_rel(float(res.tensor_norms[0]), math.sqrt(300), 1e-6)
        # three tensors: torch rounds each norm to bf16 (17.375) before the total: 30.125; exact 30
        three = [ones.clone() for _ in range(3)]
        assert float(tnu.get_total_norm(three)) == 30.125
        r = gradfuse.get_total_norm(three, backend=backend)
        assert r.dtype == torch.bfloat16 and float(r) == 30.0

    def test_fp32_large_sum_accurate(self, backend):
        n = 10**6
        needs_numel(n, backend)
        grads = [torch.full((n,), 100.0)]
        t = tnu.get_total_norm(grads)
        assert abs(float(t) - 1e5) / 1e5 > 1e-4  # torch's CPU fp32 path: 99937.164 (6e-4)
        r = gradfuse.get_total_norm(grads, backend=backend)
        assert r.dtype == torch.float32
        assert abs(float(r) - 1e5) / 1e5 <= 1e-6, float(r)

    def test_fp16_coefficient_in_fp32(self, backend):
        grads = [torch.tensor([3.0, 4.0], dtype=torch.float16)]
        tp, gp = twin_params(grads)
        tnu.clip_grad_norm_(tp, 1.0)
        r = gradfuse.clip_grad_norm_(gp, 1.0, backend=backend)
        assert float(r) == 5.0 and r.dtype == torch.float16
        want = torch.tensor([0.6, 0.8]).half()
        assert_bitwise_equal(gp[0].grad, want)
        assert tp[0].grad.tolist() == pytest.approx([0.5996, 0.7998], abs=1e-4)  # torch's fp16 coefficient

    @pytest.mark.parametrize("max_norm", [-1.0, -1e-9, math.nan, "-1", "nan", -INF])
    @pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grads"])
    def test_negative_or_nan_max_norm_raises(self, backend, max_norm, fn):
        grads = gen(120, [(5,), (2, 3)])
        ps = params_from(grads)
        snap = snapshot(grads)
        with pytest.raises(ValueError, match=r"max_norm (is NaN|must be >= 0)"):
            if fn == "clip_grad_norm_":
                gradfuse.clip_grad_norm_(ps, max_norm, backend=backend)
            elif fn == "clip_grads":
                gradfuse.clip_grads(ps, max_norm, backend=backend)
            else:
                gradfuse.clip_grads_with_norm_(ps, max_norm, torch.tensor(2.0), backend=backend)
        assert_unchanged(grads, snap)
        if fn == "clip_grad_norm_" and max_norm == -1.0:  # what torch does instead: flips the gradients
            tp = params_from([g.clone() for g in grads])
            tnu.clip_grad_norm_(tp, -1.0)
            assert bool((tp[0].grad * grads[0] < 0).all())

    @pytest.mark.parametrize("clip_value", [-1.0, math.nan])
    def test_negative_or_nan_clip_value_raises(self, clip_value):
        grads = gen(121, [(5,)])
        ps = params_from(grads)
        snap = snapshot(grads)
        with pytest.raises(ValueError, match=r"clip_value must be a number >= 0"):
            gradfuse.clip_grad_value_(ps, clip_value)
        assert_unchanged(grads, snap)

    def test_error_if_nonfinite_not_raised_for_finite_fp16_overflowing_norm(self, backend):
        grads = [torch.full((100,), 10000.0, dtype=torch.float16)]  # norm 1e5 > 65504, every element finite
        tp, gp = twin_params(grads)
        with pytest.raises(RuntimeError, match="non-finite"):
            tnu.clip_grad_norm_(tp, 1.0, error_if_nonfinite=True)
        r = gradfuse.clip_grad_norm_(gp, 1.0, error_if_nonfinite=True, backend=backend)
        assert r.dtype == torch.float16 and float(r) == INF  # torch's dtype cannot hold 1e5
        assert bool(torch.isfinite(gp[0].grad).all())
        assert float(torch.linalg.vector_norm(gp[0].grad.double())) == pytest.approx(1.0, rel=2 * 2.0**-11)
