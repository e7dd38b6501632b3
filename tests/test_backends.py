"""Backend choice, the reference route for what no fused backend runs, the plan cache, and the
``torch.library`` custom ops."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.utils as tnu
from helpers import (
    BACKENDS_CPU,
    CPU_BACKENDS,
    FUSED_CPU_BACKENDS,
    assert_close_rel,
    assert_unchanged,
    bits,
    chunk_size,
    param_with_grad,
    params_from,
    required_backend_errors,
    snapshot,
    twin_params,
)

import gradfuse
from gradfuse import _abi, _backends, _engine, _plan, ops


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def fresh(grads):
    return params_from([g.clone() for g in grads])


# ------------------------------------------------------------------------------------------------
# Choice


def test_auto_on_cpu_picks_cpu_when_built():
    res = gradfuse.clip_grads(fresh([randn(10)]), 1.0)
    want = "cpu" if "cpu" in BACKENDS_CPU else "torch"
    assert res.backend == want
    # auto never picks the interpreted Triton kernels for CPU tensors
    assert _backends.choose("auto", torch.device("cpu")) is (_backends.FUSED_BACKENDS["cpu"] if want == "cpu" else None)


def test_required_backends_check():
    """GRADFUSE_TEST_REQUIRE's check: a backend that runs here on any device the tests run it on
    passes; one that runs nowhere, or a name that is no backend, is an error with the reason."""
    assert required_backend_errors(["torch", *BACKENDS_CPU]) == []
    (bogus,) = required_backend_errors(["bogus"])
    assert "'bogus' is not a backend" in bogus and "cpu" in bogus
    if not torch.cuda.is_available():
        (cuda,) = required_backend_errors(["cuda"])
        assert cuda == "'cuda' cannot run here: on cuda tensors, no CUDA device"


def test_cpu_module_built_when_a_compiler_is_present():
    """CI installs with a C++ compiler: the cpu backend must be there (the reference is not a build)."""
    if importlib.util.find_spec("gradfuse._C_cpu") is None:
        pytest.skip("gradfuse._C_cpu is not built in this checkout")
    assert "cpu" in gradfuse.available_backends("cpu")


def test_reference_path_costs_a_few_ops_per_group_not_per_tensor():
    """backend="torch" (also the route of DTensor and other subclasses) runs torch's foreach ops per
    (device, dtype) group: the number of aten calls does not grow with the number of gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    def ops(n, dtypes, p):
        params = fresh([randn(5 + i % 3, dtype=dtypes[i % len(dtypes)], seed=i) * 10 for i in range(n)])
        with CountOps() as count:
            gradfuse.clip_grads(params, 1.0, p, backend="torch")
        return count.calls

    for dtypes in ([torch.bfloat16], [torch.float32, torch.float16]):
        for p in (2.0, math.inf):
            assert ops(4, dtypes, p) == ops(64, dtypes, p), (dtypes, p)


def test_triton_available_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CUDA device is present: the kernels are not interpreted")
    assert "triton" in gradfuse.available_backends("cpu"), _backends.FUSED_BACKENDS["triton"].unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explicit_backend_is_used(backend):
    res = gradfuse.clip_grads(fresh([randn(10), randn(3, dtype=torch.bfloat16)]), 1.0, backend=backend)
    assert res.backend == backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_env_var_selects_backend(backend, monkeypatch):
    monkeypatch.setenv("GRADFUSE_BACKEND", backend)
    assert gradfuse.clip_grads(fresh([randn(10)]), 1.0).backend == backend
    # the argument overrides the environment
    assert gradfuse.clip_grads(fresh([randn(10)]), 1.0, backend="torch").backend == "torch"
    monkeypatch.setenv("GRADFUSE_BACKEND", "auto")
    assert gradfuse.clip_grads(fresh([randn(10)]), 1.0).backend == ("cpu" if "cpu" in BACKENDS_CPU else "torch")


def test_env_var_read_at_call_time(monkeypatch):
    grads = [randn(10)]
    monkeypatch.setenv("GRADFUSE_BACKEND", "torch")
    assert gradfuse.clip_grads(fresh(grads), 1.0).backend == "torch"
    monkeypatch.delenv("GRADFUSE_BACKEND")
    assert gradfuse.clip_grads(fresh(grads), 1.0).backend == ("cpu" if "cpu" in BACKENDS_CPU else "torch")


def test_triton_without_interpreter_in_a_fresh_process():
    """Without TRITON_INTERPRET (and no GPU) Triton cannot take CPU tensors: not offered, and an
    explicit request says how to enable it."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels are compiled, not interpreted")
    code = textwrap.dedent(
        """
        import torch, gradfuse
        assert "triton" not in gradfuse.available_backends("cpu"), gradfuse.available_backends("cpu")
        try:
            gradfuse.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0, backend="triton")  # no grads: no backend needed
            p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
            gradfuse.clip_grad_norm_([p], 1.0, backend="triton")
        except gradfuse.BackendUnavailableError as e:
            assert "TRITON_INTERPRET=1" in str(e), str(e)
            assert p.grad.tolist() == [1.0, 1.0, 1.0]
            print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GRADFUSE_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(gradfuse.__file__)), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------
# The reference route: what no fused backend runs still gives torch's results


class MyTensor(torch.Tensor):
    pass


def _cases():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=g)
    dup = torch.randn(5, generator=g)

    def create_graph():
        m = torch.nn.Linear(3, 2)
        (m(torch.randn(4, 3, generator=g)) ** 2).sum().backward(create_graph=True)
        return [p.grad for p in m.parameters()]

    return {
        "fp64": (lambda: [torch.randn(7, generator=g, dtype=torch.float64), torch.randn(3, generator=g)], "dtype torch.float64"),
        "complex": (lambda: [torch.randn(7, generator=g, dtype=torch.complex64)], "dtype torch.complex64"),
        "subclass": (lambda: [torch.randn(6, generator=g).as_subclass(MyTensor)], "a MyTensor, a tensor subclass"),
        "strided_gaps": (lambda: [base[:, ::2]], "a strided view with gaps or overlaps"),
        "expanded": (lambda: [torch.randn(1, 4, generator=g).expand(3, 4)], "a strided view with gaps or overlaps"),
        "duplicate": (lambda: [dup, randn(3), dup], "gradients 0 and 2 share memory"),
        "requires_grad": (create_graph, "requires grad (create_graph)"),
    }


CASES = _cases()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_ineligible_goes_to_reference(backend, case):
    make, reason = CASES[case]
    grads = make()
    assert reason in (_engine.fused_ineligible_reason(grads) or ""), _engine.fused_ineligible_reason(grads)
    if case == "expanded":  # torch cannot scale an expanded tensor in place either; compare the norm
        t = tnu.get_total_norm(grads)
        r = gradfuse.get_total_norm(grads, backend=backend)
        assert_close_rel(float(r), float(t), 1e-6)
        return
    if case == "duplicate":
        tp, gp = twin_params(grads[:2])
        tp, gp = tp + [tp[0]], gp + [gp[0]]
    elif case == "requires_grad":
        tp, gp = params_from([g.detach().clone().requires_grad_() * 1 for g in grads]), params_from([g.detach().clone().requires_grad_() * 1 for g in grads])
    else:
        tp, gp = twin_params(grads)
    t = tnu.clip_grad_norm_(tp, 0.1)
    res = gradfuse.clip_grads(gp, 0.1, backend=backend)
    assert res.backend == "torch"
    assert float(res.total_norm) == pytest.approx(float(t), rel=1e-6)
    for a, b in zip(gp, tp):
        assert type(a.grad) is type(b.grad)
        assert a.grad.stride() == b.grad.stride()
        torch.testing.assert_close(a.grad.detach(), b.grad.detach(), rtol=2e-6, atol=0)


def test_subclass_result_type_like_torch():
    grads = [randn(6).as_subclass(MyTensor)]
    tp, gp = twin_params(grads)
    t = tnu.clip_grad_norm_(tp, 0.5)
    r = gradfuse.clip_grad_norm_(gp, 0.5)
    assert type(r) is type(t)
    assert float(r) == pytest.approx(float(t), rel=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_gaps_untouched(backend):
    buf = randn(40)
    view = buf[::4]
    gaps = buf.view(10, 4)[:, 1:].clone()
    gradfuse.clip_grad_norm_([param_with_grad(view)], 0.01, backend=backend)
    assert torch.equal(buf.view(10, 4)[:, 1:], gaps)
    assert float(view.double().norm()) == pytest.approx(0.01, rel=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm"])
def test_sparse_raises_like_torch(backend, fn):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1.0, 0.0, 2.0, 0.0]).to_sparse()
    q = param_with_grad(randn(4))
    with pytest.raises(NotImplementedError) as t_err:
        tnu.clip_grad_norm_([q, p], 1.0) if fn == "clip_grad_norm_" else tnu.get_total_norm([q.grad, p.grad])
    snap = snapshot([q.grad])
    with pytest.raises(NotImplementedError) as g_err:
        if fn == "clip_grad_norm_":
            gradfuse.clip_grad_norm_([q, p], 1.0, backend=backend)
        else:
            gradfuse.get_total_norm([q.grad, p.grad], backend=backend)
    assert str(g_err.value).split("\n")[0] == str(t_err.value).split("\n")[0]
    assert "SparseCPU" in str(g_err.value)
    assert_unchanged([q.grad], snap)


@pytest.mark.parametrize("order", ["cpu_first", "meta_first"])
def test_several_devices_like_torch(order):
    """cpu + meta: the only second device on a CPU machine (cpu + cuda is in test_gpu). torch fails
    moving a meta norm or coefficient to the CPU; gradfuse fails the same way, routed to the reference."""
    a = param_with_grad(randn(3))
    b = torch.nn.Parameter(torch.empty(3, device="meta"))
    b.grad = torch.empty(3, device="meta")
    params = [a, b] if order == "cpu_first" else [b, a]
    assert _engine.fused_ineligible_reason([p.grad for p in params]) == "the gradients are on several devices"
    with pytest.raises(Exception) as t_err:
        tnu.clip_grad_norm_(params, 1.0)
    with pytest.raises(Exception) as g_err:
        gradfuse.clip_grad_norm_(params, 1.0)
    assert type(g_err.value) is type(t_err.value)
    assert str(g_err.value) == str(t_err.value)


def test_ineligible_reason_none_for_dense_layouts():
    base = randn(6, 5)
    grads = [base.t(), randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), randn(9)[1:], torch.empty(0), randn(3).half(), randn(3).bfloat16()]
    assert _engine.fused_ineligible_reason(grads) is None


# ------------------------------------------------------------------------------------------------
# Plan cache


@pytest.fixture
def plans():
    _plan.PLANS.clear()
    yield _plan.PLANS
    _plan.PLANS.clear()


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_plan_cache_hit_on_same_storages(backend, plans):
    grads = [randn(100), randn(7, dtype=torch.float16), randn(3, 3, dtype=torch.bfloat16)]
    params = params_from(grads)
    gradfuse.clip_grad_norm_(params, 1e9, backend=backend)
    assert plans.misses == 1 and plans.hits == 0
    for step in range(3):
        for g in grads:  # new values in the same storages (what a training loop does)
            g.copy_(randn(*g.shape, seed=step + 10).to(g.dtype))
        r = gradfuse.clip_grads(params, 0.5, backend=backend)
        assert plans.hits == step + 1 and plans.misses == 1
        # and the cached plan reads the new values
        want = math.sqrt(sum(float(g.double().pow(2).sum()) for g in [randn(*g.shape, seed=step + 10).to(g.dtype) for g in grads]))
        assert_close_rel(float(r.total_norm), want, 1e-6)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("change", ["append", "drop", "reorder", "new_storage", "dtype", "numel"])
def test_plan_cache_rebuild_on_changed_list(backend, change, plans):
    grads = [randn(100), randn(7, dtype=torch.float16), randn(3, 3, dtype=torch.bfloat16)]
    gradfuse.get_total_norm(grads, backend=backend)
    assert plans.misses == 1
    if change == "append":
        new = grads + [randn(5, seed=1)]
    elif change == "drop":
        new = grads[:2]
    elif change == "reorder":
        new = [grads[1], grads[0], grads[2]]
    elif change == "new_storage":
        new = [grads[0].clone(), grads[1], grads[2]]
    elif change == "dtype":
        new = [grads[0], grads[1].view(torch.bfloat16), grads[2]]  # same address and numel, other dtype
    else:
        new = [grads[0][:50], grads[1], grads[2]]  # same address, fewer elements
    r = gradfuse.get_total_norm(new, backend=backend)
    assert plans.misses == 2 and plans.hits == 0
    assert_close_rel(float(r.float()), float(tnu.get_total_norm([g.double() for g in new])), 2e-3 if change == "dtype" else 1e-6)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_plan_cache_same_address_other_layout(backend, plans):
    """A cache hit on (address, numel, dtype) must not treat a strided view as contiguous."""
    buf = randn(24)
    contiguous = buf[:12]
    strided = buf[::2]  # same address, same numel and dtype: the same fingerprint
    assert _plan.fingerprint([contiguous], (torch.float32,)) == _plan.fingerprint([strided], (torch.float32,))
    gradfuse.get_total_norm([contiguous], backend=backend)
    want = float(strided.double().norm())
    r = gradfuse.clip_grads([param_with_grad(strided)], 0.1, backend=backend)
    assert r.backend == "torch"  # routed to the reference despite the cached plan
    assert_close_rel(float(r.total_norm), want, 1e-6)
    assert_close_rel(float(strided.double().norm()), 0.1, 1e-6)
    assert float(buf[1::2].double().norm()) == pytest.approx(float(randn(24)[1::2].double().norm()), rel=0)  # gaps untouched
    # a transposed dense view at the same address reuses the plan and is right
    square = randn(16)
    gradfuse.get_total_norm([square.view(4, 4)], backend=backend)
    hits = plans.hits
    r = gradfuse.get_total_norm([square.view(4, 4).t()], backend=backend)
    assert plans.hits == hits + 1
    assert_close_rel(float(r), float(square.double().norm()), 1e-6)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_plan_cache_is_bounded_lru(backend, plans):
    lists = [[randn(3 + i)] for i in range(_plan._CACHE_SIZE + 1)]
    for grads in lists:
        gradfuse.get_total_norm(grads, backend=backend)
    assert plans.misses == len(lists) and len(plans._plans) == _plan._CACHE_SIZE
    gradfuse.get_total_norm(lists[-1], backend=backend)
    assert plans.hits == 1
    gradfuse.get_total_norm(lists[0], backend=backend)  # evicted first
    assert plans.misses == len(lists) + 1


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_plan_tables(backend, plans):
    c = chunk_size(backend)
    grads = [randn(c + 5), torch.empty(0), randn(3, dtype=torch.float16), randn(2 * c, dtype=torch.bfloat16)]
    plan = _plan.build_plan(grads, c)
    assert plan.num_tensors == 4 and plan.num_chunks == 2 + 0 + 1 + 2
    assert plan.addrs.tolist() == [g.data_ptr() for g in grads]
    assert plan.numels.tolist() == [c + 5, 0, 3, 2 * c]
    assert plan.dtypes.tolist() == [_abi.DTYPE_F32, _abi.DTYPE_F32, _abi.DTYPE_F16, _abi.DTYPE_BF16]
    assert plan.tensor_chunk_begin.tolist() == [0, 2, 2, 3, 5]
    assert plan.chunk_tensor.tolist() == [0, 0, 2, 3, 3]
    assert plan.chunk_start.tolist() == [0, c, 0, 0, c]
    assert plan.total_numel == 3 * c + 8
    assert int(plan.ticket) == 0
    res = gradfuse.clip_grads(params_from([g.clone() for g in grads]), 1.0, backend=backend)
    assert res.tensor_norms[1].item() == 0.0


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_ticket_reset_between_calls(backend, plans):
    grads = [randn(1000), randn(10)]
    for _ in range(3):
        gradfuse.get_total_norm(grads, backend=backend)
        (plan,) = plans._plans.values()
        assert int(plan.ticket) == 0


# ------------------------------------------------------------------------------------------------
# Custom ops


def _op_args(backend, apply=True, policy=_abi.POLICY_PROPAGATE, inv_scale=None, max_norm_tensor=None):
    grads = [randn(5, 3), randn(4, dtype=torch.float16), randn(7, dtype=torch.bfloat16)]
    return (grads, 0.5, max_norm_tensor, 2.0, apply, policy, inv_scale, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "variant",
    ["apply", "no_apply", "skip_policy", "inv_scale", "max_norm_tensor"],
)
def test_opcheck_clip(backend, variant):
    kw = {
        "apply": {},
        "no_apply": {"apply": False},
        "skip_policy": {"policy": _abi.POLICY_SKIP},
        "inv_scale": {"inv_scale": torch.tensor(0.25)},
        "max_norm_tensor": {"max_norm_tensor": torch.tensor(0.5)},
    }[variant]
    args = _op_args(backend, **kw)
    torch.library.opcheck(torch.ops.gradfuse.clip_.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale,zero", [(0.5, False), (1.0, False), (0.0, True)])
def test_opcheck_scale(backend, scale, zero):
    grads = [randn(5, 3), randn(4, dtype=torch.float16)]
    torch.library.opcheck(torch.ops.gradfuse.scale_.default, (grads, torch.tensor([scale]), zero, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_op_results(backend):
    grads = [randn(5, 3), randn(4, dtype=torch.float16)]
    before = [g.clone() for g in grads]
    outputs = torch.ops.gradfuse.clip_(grads, 0.5, None, 2.0, True, _abi.POLICY_PROPAGATE, None, backend)
    assert len(outputs) == len(ops.RESULT_FIELDS)
    r = ops.unpack(outputs, grads, backend, 2.0)
    for name, dtype, shape in ops.RESULT_FIELDS:  # every field as declared
        field = getattr(r, name)
        assert field.dtype == (dtype or torch.float32) and field.shape == tuple(len(grads) if n == ops.T else n for n in shape), name
    total = math.sqrt(sum(float(b.double().pow(2).sum()) for b in before))
    assert_close_rel(float(r.total_norm), total, 1e-6)
    assert float(r.found_inf) == 0.0
    assert_close_rel(float(r.clip_coef), 0.5 / (total + 1e-6), 1e-6)
    for got, b in zip(r.tensor_norms.tolist(), before):
        assert_close_rel(got, float(b.double().norm()), 1e-6)
    assert_close_rel(float(grads[0].double().norm() ** 2 + grads[1].double().norm() ** 2) ** 0.5, 0.5, 2e-3)
    grads64 = [randn(3, dtype=torch.float64)]
    r64 = ops.unpack(torch.ops.gradfuse.clip_(grads64, 0.5, None, 2.0, False, 0, None, backend), grads64, backend, 2.0)
    assert r64.total_norm.dtype == r64.tensor_norms.dtype == torch.float64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scale_op(backend):
    grads = [randn(6), randn(5, dtype=torch.bfloat16)]
    snap = snapshot(grads)
    torch.ops.gradfuse.scale_(grads, torch.tensor([1.0]), False, backend)
    assert_unchanged(grads, snap)
    before = [g.clone() for g in grads]
    torch.ops.gradfuse.scale_(grads, torch.tensor([0.5]), False, backend)
    for a, b in zip(grads, before):
        assert bits(a).equal(bits((b.double() * 0.5).to(b.dtype)))
    grads[0][0] = math.nan
    torch.ops.gradfuse.scale_(grads, torch.tensor([0.0]), True, backend)
    assert all(not bool(g.any()) for g in grads)
