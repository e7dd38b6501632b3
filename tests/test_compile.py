"""torch.compile(fullgraph=True) traces through gradfuse (the ``gradfuse::clip_`` / ``gradfuse::scale_``
custom ops) without graph breaks, and the compiled step matches eager.

A full training step needs ``torch._dynamo.config.trace_autograd_ops`` for ``loss.backward()`` and a
hand-written SGD update: ``torch.optim``'s ``step`` graph-breaks on purpose (pytorch#104053), with
torch's clipping as well as gradfuse's. Graph-break checks use ``torch._dynamo.explain`` (no
inductor, fast); parity uses ``aot_eager`` (functionalization and the fake kernels, no C++ build) and
one ``inductor`` compile per backend (slow: it runs the C++ compiler).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo
from helpers import CPU_BACKENDS, assert_unchanged, bits, params_from, snapshot

import gradfuse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _reset_dynamo():
    """Fresh dynamo caches per test, and grad mode restored: a compiled graph that raises midway
    skips its trailing set_grad_enabled(True) and would leave grad mode off for the next test."""
    torch._dynamo.reset()
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)
    torch._dynamo.reset()


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def batch(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)


def make_step(model, clip, lr=0.1):
    params = list(model.parameters())

    def step(x, y):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        norm = clip(params)
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
        for p in params:
            p.grad = None
        return loss.detach(), norm

    return step


def clip_fn(kind: str, backend: str, max_norm: float = 0.05):
    if kind == "clip_grad_norm_":
        return lambda ps: gradfuse.clip_grad_norm_(ps, max_norm, backend=backend)
    if kind == "norm_then_clip":

        def f(ps):
            total = gradfuse.get_total_norm([p.grad for p in ps], backend=backend)
            gradfuse.clip_grads_with_norm_(ps, max_norm, total, backend=backend)
            return total

        return f
    if kind == "clip_grads":
        return lambda ps: gradfuse.clip_grads(ps, max_norm, inv_scale=torch.tensor(0.5), backend=backend).total_norm
    if kind == "error_if_nonfinite":
        return lambda ps: gradfuse.clip_grad_norm_(ps, max_norm, error_if_nonfinite=True, backend=backend)
    if kind == "inf_norm":
        return lambda ps: gradfuse.clip_grad_norm_(ps, max_norm, "inf", backend=backend)
    raise AssertionError(kind)


KINDS = ["clip_grad_norm_", "norm_then_clip", "clip_grads", "error_if_nonfinite", "inf_norm"]


def run_steps(step, n=3):
    out = []
    for i in range(n):
        x, y = batch(seed=10 + i)
        loss, norm = step(x, y)
        out.append((float(loss), float(norm)))
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_training_step_has_no_graph_breaks(backend, kind):
    model = make_model()
    step = make_step(model, clip_fn(kind, backend))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(step)(*batch())
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_step_matches_eager_aot_eager(backend, kind):
    eager_model = make_model()
    compiled_model = copy.deepcopy(eager_model)
    eager = run_steps(make_step(eager_model, clip_fn(kind, backend)))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(make_step(compiled_model, clip_fn(kind, backend)), fullgraph=True, backend="aot_eager")
        got = run_steps(compiled)
    for (l1, n1), (l2, n2) in zip(eager, got):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert n2 == pytest.approx(n1, rel=1e-5)
    assert n1 > 0.05  # the clip did clip
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b.values[0] in ("torch", "cpu")])
def test_compiled_step_matches_eager_inductor(backend):
    eager_model = make_model()
    compiled_model = copy.deepcopy(eager_model)
    eager = run_steps(make_step(eager_model, clip_fn("clip_grad_norm_", backend)))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(make_step(compiled_model, clip_fn("clip_grad_norm_", backend)), fullgraph=True)
        got = run_steps(compiled)
    for (l1, n1), (l2, n2) in zip(eager, got):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert n2 == pytest.approx(n1, rel=1e-5)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_clip_of_given_grads_is_bitwise_eager(backend):
    """Compiling only the clip (grads from an eager backward): the custom op runs the same kernels."""
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(40, generator=g), torch.randn(9, generator=g).half(), torch.randn(3, 3, generator=g).bfloat16()]
    pe, pc = params_from([x.clone() for x in grads]), params_from([x.clone() for x in grads])
    want = gradfuse.clip_grad_norm_(pe, 0.3, backend=backend)
    fn = torch.compile(lambda ps: gradfuse.clip_grad_norm_(ps, 0.3, backend=backend), fullgraph=True, backend="aot_eager")
    got = fn(pc)
    assert got.dtype == want.dtype == torch.float32
    assert bits(got).equal(bits(want))
    for a, b in zip(pc, pe):
        assert bits(a.grad).equal(bits(b.grad))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_error_if_nonfinite_raises_before_touching(backend):
    g = torch.Generator().manual_seed(6)
    grads = [torch.randn(12, generator=g), torch.randn(5, generator=g)]
    grads[1][2] = math.nan
    params = params_from(grads)
    snap = snapshot(grads)
    fn = torch.compile(lambda ps: gradfuse.clip_grad_norm_(ps, 0.1, error_if_nonfinite=True, backend=backend), fullgraph=True, backend="aot_eager")
    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="non-finite"):
        fn(params)
    assert_unchanged(grads, snap, "a gradient was scaled before the non-finite error")
    assert torch.is_grad_enabled(), "the compiled clip raised and left grad mode disabled"
    # finite gradients: no error, clipped
    ok = params_from([torch.randn(12, generator=g)])
    r = fn(ok)
    assert float(ok[0].grad.double().norm()) == pytest.approx(0.1, rel=1e-5) and float(r) > 0.1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_compiled_dtypes(backend, dtype):
    """fp64 (reference route inside the op: fp64 outputs) and fp16 (torch's dtype for the norm)."""
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(10, generator=g).to(dtype), torch.randn(4, generator=g).to(dtype)]
    pe, pc = params_from([x.clone() for x in grads]), params_from([x.clone() for x in grads])
    want = gradfuse.clip_grad_norm_(pe, 0.2, backend=backend)
    fn = torch.compile(lambda ps: gradfuse.clip_grad_norm_(ps, 0.2, backend=backend), fullgraph=True, backend="aot_eager")
    got = fn(pc)
    assert got.dtype == want.dtype == dtype
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["norm_then_clip", "error_if_nonfinite"])
def test_compiled_fp64_scale_is_bitwise_eager(backend, kind):
    """The scale pass under compile gets the factor eager gets (fp64 for fp64 gradients, not
    rounded to fp32 on the way into the op)."""
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(50, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    pe, pc = params_from([x.clone() for x in grads]), params_from([x.clone() for x in grads])
    clip = clip_fn(kind, backend, max_norm=0.3)
    want = clip(pe)
    got = torch.compile(clip, fullgraph=True, backend="aot_eager")(pc)
    assert float(want) > 0.3 and bits(got).equal(bits(want))
    for a, b in zip(pc, pe):
        assert bits(a.grad).equal(bits(b.grad))
