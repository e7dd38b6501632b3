"""The cases of tests/test_distributed.py, run inside every rank of one gloo process group.

``run(rank, world, port, out)`` joins the group (127.0.0.1, a short timeout so a hang fails fast),
runs every case registered for the world size in order (a barrier between cases), and writes
``{case: "ok" | traceback}`` to ``out/rank<r>.json``. Each case asserts on this rank; assertions on
global values (totals, flags) hold on every rank at once, so a failure fails the same case
everywhere instead of leaving a rank waiting in a collective.

Oracles: the fp64 norm of the unsharded gradients (``full_tensor()``, gathered outside the counted
region), torch's clip on clones of the same gradients (where torch can do it), and the clipped
gradients against ``fp64 gradient * coefficient``. Every gradfuse call is counted: collectives
(``CommDebugMode`` sees the c10d ops) and host syncs (``aten._local_scalar_dense``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback

started = time.monotonic()  # this module is the first thing a rank imports

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

import gradfuse

P_ALL = (2.0, 1.0, 3.0, math.inf, -math.inf, 0.0)
DTYPES = (torch.float32, torch.bfloat16)
RTOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}  # one rounding of x * coef to the dtype
TOTAL_RTOL = 1e-5  # gradfuse's total against the fp64 oracle (fp32 chunk sums, fp64 combine)

CASES: dict[int, list] = {2: [], 4: []}


def case(*worlds):
    def register(fn):
        for w in worlds:
            CASES[w].append(fn)
        return fn

    return register


def names(world: int) -> list[str]:
    return [fn.__name__ for fn in CASES[world]]


# --------------------------------------------------------------------------------------------------
# Counting collectives and host syncs


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
            self.where = self.where if self.count > 1 else "".join(traceback.format_stack(limit=12))
        return func(*args, **(kwargs or {}))


class Counted:
    """``with Counted() as c: ...``; then ``c.collectives`` and ``c.syncs``."""

    def __enter__(self):
        self._comm, self._syncs = CommDebugMode(), _Syncs()
        self._comm.__enter__()
        self._syncs.__enter__()
        return self

    def __exit__(self, *exc):
        self._syncs.__exit__(*exc)
        self._comm.__exit__(*exc)
        self.collectives, self.syncs, self.sync_at = self._comm.get_total_counts(), self._syncs.count, self._syncs.where
        return False


def counted(fn, *args, collectives: int | None, syncs: int = 0, **kwargs):
    """``fn(*args, **kwargs)``, asserting how many collectives and host syncs it made."""
    with Counted() as c:
        out = fn(*args, **kwargs)
    if collectives is not None:
        assert c.collectives == collectives, f"{fn.__name__}: {c.collectives} collectives, expected {collectives}"
    assert c.syncs == syncs, f"{fn.__name__}: {c.syncs} host syncs, expected {syncs}; the first at\n{c.sync_at}"
    return out


# --------------------------------------------------------------------------------------------------
# Oracles


def full(g: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor (a replicated DTensor's full_tensor() is its local tensor itself)."""
    return (g.full_tensor() if isinstance(g, DTensor) else g.detach()).clone()


def norm64(tensors: list[torch.Tensor], p: float) -> float:
    """torch's total norm formula in fp64: the p-norm of the per-tensor p-norms (empty tensors
    left out at +-inf, where they have no identity)."""
    ts = [t.double().flatten() for t in tensors if t.numel() or p not in (math.inf, -math.inf)]
    if not ts:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, p) for t in ts]), p))


def coef64(total: float, max_norm: float) -> float:
    return min(1.0, max_norm / (total + 1e-6))


def assert_close(got: float, want: float, rtol: float, what: str) -> None:
    if math.isnan(want):
        assert math.isnan(got), f"{what}: {got}, expected NaN"
        return
    assert got == want or abs(got - want) <= rtol * abs(want), f"{what}: {got!r}, expected {want!r} (rtol {rtol})"


def assert_scaled(after: list[torch.Tensor], before: list[torch.Tensor], coef: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(after, before)):
        want = (b.double() * coef).to(b.dtype)
        torch.testing.assert_close(a, want, rtol=RTOL[b.dtype], atol=0, msg=lambda m: f"{what}, gradient {i}: {m}")


def same_on_every_rank(t: torch.Tensor, what: str, group=None) -> None:
    """``t``'s bits are the same on every rank of ``group``."""
    mine = t.detach().reshape(-1).contiguous().view(torch.uint8).tolist()
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    assert all(x == mine for x in every), f"{what}: differs between ranks: {every}"


def any_rank(flag: bool) -> bool:
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item())


def holders(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters holding clones of ``grads`` (DTensors stay DTensors): torch's copy to clip."""
    out = []
    for g in grads:
        h = torch.nn.Parameter(torch.zeros_like(g))
        h.grad = g.detach().clone()
        out.append(h)
    return out


def grads_of(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


def check_clip(params, p: float, *, torch_too: bool, what: str, collectives: int | None = 1):
    """clip_grad_norm_ on ``params`` against the fp64 oracle of the unsharded gradients, torch's
    clip on clones (``torch_too``) and the bits on every rank."""
    grads = grads_of(params)
    before = [full(g) for g in grads]
    want = norm64(before, p)
    max_norm = 0.5 * want if want and math.isfinite(want) else 1.0
    theirs = holders(grads) if torch_too else None
    total = counted(gradfuse.clip_grad_norm_, params, max_norm, p, collectives=collectives)
    dtensors = any(isinstance(g, DTensor) for g in grads)
    assert isinstance(total, DTensor) == dtensors, f"{what}: returned a {type(total).__name__}"
    mine = local(total)
    same_on_every_rank(mine, f"{what}: total")
    r = float(mine)
    assert_close(r, want, TOTAL_RTOL if mine.dtype != torch.bfloat16 else RTOL[torch.bfloat16], f"{what}: total")
    assert_scaled([full(g) for g in grads], before, coef64(want, max_norm), what)
    if torch_too:
        t = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p)
        assert_close(r, float(full(t)), 2 * RTOL[grads[0].dtype], f"{what}: total against torch's")
        for i, (a, b) in enumerate(zip(grads, theirs)):
            torch.testing.assert_close(full(a), full(b.grad), rtol=2 * RTOL[a.dtype], atol=1e-30, msg=lambda m: f"{what} {i} vs torch: {m}")
    return want


# --------------------------------------------------------------------------------------------------
# Models


def fsdp_model(mesh, dtype=torch.float32, seed: int = 0, widths=(16, 7, 3, 1)):
    """An MLP sharded by FSDP2 with uneven shards (and empty ones on the last ranks), after one
    backward."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = torch.nn.Sequential(*layers).to(dtype)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(seed + 1 + dist.get_rank())
    model(torch.randn(8, widths[0], dtype=dtype)).square().sum().backward()
    return model


class TPBlock(torch.nn.Module):
    """Colwise then Rowwise Linear, then a LayerNorm whose parameters are replicated."""

    def __init__(self, d: int = 8, h: int = 12):
        super().__init__()
        self.up, self.down, self.norm = torch.nn.Linear(d, h), torch.nn.Linear(h, d), torch.nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.down(torch.relu(self.up(x))))


def tp_block(tp_mesh, seed: int = 0, dp_mesh=None):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    block = TPBlock()
    parallelize_module(block, tp_mesh, {"up": ColwiseParallel(), "down": RowwiseParallel(use_local_output=False)})
    for name, param in list(block.norm.named_parameters()):
        block.norm.register_parameter(name, torch.nn.Parameter(distribute_tensor(param.data, tp_mesh, [Replicate()])))
    if dp_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(block, mesh=dp_mesh)
    torch.manual_seed(seed + 1 + (dp_mesh.get_local_rank() if dp_mesh is not None else 0))
    block(torch.randn(4, 8)).full_tensor().square().sum().backward()
    return block


def poison(params, rank: int, value: float) -> None:
    """Write ``value`` into the first element of the first non-empty local gradient on ``rank``."""
    if dist.get_rank() != rank:
        return
    for p in params:
        g = local(p.grad)
        if g.numel():
            g.view(-1)[0] = value
            return
    raise AssertionError("no local gradient to poison")


# --------------------------------------------------------------------------------------------------
# Cases on 2 ranks (some on 4 too)


@case(2)
def ddp_plain_gradients_clip_locally():
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)))
    torch.manual_seed(dist.get_rank())
    model(torch.randn(3, 6)).square().sum().backward()
    for p in P_ALL:  # DDP gradients are plain and already averaged: no collective, the same bits everywhere
        grads = grads_of(model.parameters())
        snapshot = [g.clone() for g in grads]
        check_clip(list(model.parameters()), p, torch_too=True, what=f"ddp p={p}", collectives=0)
        for g, s in zip(grads, snapshot):
            g.copy_(s)


@case(2, 4)
def fsdp2_uneven_and_empty_shards_every_p_and_dtype():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for dtype in DTYPES:
        for p in P_ALL:
            model = fsdp_model(mesh, dtype)
            params = list(model.parameters())
            empty = any_rank(any(local(g).numel() == 0 for g in grads_of(params)))
            assert empty, "the model should give some rank an empty shard"
            # torch raises on the rank with the empty shard at +-inf and hangs the others: not asked
            check_clip(params, p, torch_too=p not in (math.inf, -math.inf), what=f"fsdp2 {dtype} p={p}")


@case(2)
def tp_colwise_rowwise_with_replicated_norm():
    mesh = init_device_mesh("cpu", (2,))
    for p in P_ALL:
        block = tp_block(mesh)
        placements = {tuple(map(type, q.grad.placements)) for q in block.parameters()}
        assert (Replicate,) in placements and (Shard,) in placements, placements
        check_clip(list(block.parameters()), p, torch_too=p != 0.0, what=f"tp p={p}")


def _stage_params(seed: int, width: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    stage = torch.nn.Linear(6, width)
    stage(torch.randn(4, 6)).square().sum().backward()
    return list(stage.parameters())


def _gathered_oracle(counted_here):
    """The fp64 total of every rank's ``counted_here`` gradients (pipeline layouts)."""

    def oracle(grads, p):
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, [full(g) for g in counted_here])
        return norm64([g for part in every for g in part], p)

    return oracle


@case(2)
def pipeline_stages_with_group_and_a_tied_copy():
    rank = dist.get_rank()
    stage = _stage_params(100 + rank, 3 + 2 * rank)
    torch.manual_seed(7)  # a tied embedding: the same gradient on both stages (all-reduced by the trainer)
    tied = torch.nn.Parameter(torch.zeros(5, 4))
    tied.grad = torch.randn(5, 4)
    excluded = [tied] if rank == 1 else None
    counted_here = stage + ([tied] if rank == 0 else [])
    for p in P_ALL:
        params = stage + [tied]
        snapshot = [q.grad.clone() for q in params]
        want = _gathered_oracle([q.grad for q in counted_here])(None, p)
        max_norm = 0.5 * want if want else 1.0
        total = counted(gradfuse.clip_grad_norm_, params, max_norm, p, collectives=1, group=dist.group.WORLD, exclude_from_norm=excluded)
        assert type(total) is torch.Tensor
        same_on_every_rank(total, f"pipeline p={p}")
        assert_close(float(total), want, TOTAL_RTOL, f"pipeline p={p}")
        assert_scaled([q.grad for q in params], snapshot, coef64(want, max_norm), f"pipeline p={p}")
        for q, s in zip(params, snapshot):
            q.grad.copy_(s)
    # A stage without gradients still takes part (every rank of the group must call) and gets the total.
    mine = stage if rank == 0 else []
    want = _gathered_oracle([q.grad for q in mine])(None, 2.0)
    total = counted(gradfuse.get_total_norm, [q.grad for q in mine], collectives=1, group=dist.group.WORLD)
    assert_close(float(total), want, TOTAL_RTOL, "a stage without gradients")
    r = counted(gradfuse.clip_grads, [] if rank else stage, 1.0, collectives=1, group=dist.group.WORLD, nonfinite="skip")
    assert r is not None and float(r.found_inf) == 0.0


@case(2)
def nan_or_inf_on_one_rank_under_each_policy():
    mesh = init_device_mesh("cpu", (2,))
    for p in (2.0, math.inf, -math.inf):  # the NaN reaches every rank whatever the reduce op
        model = fsdp_model(mesh)
        params = list(model.parameters())
        poison(params, 1, math.nan)
        theirs = holders(grads_of(params)) if p == 2.0 else None
        total = counted(gradfuse.clip_grad_norm_, params, 1.0, p, collectives=1)
        assert math.isnan(float(local(total))), f"p={p}: total {total}"
        for g in grads_of(params):
            assert local(g).isnan().all(), f"p={p}: propagate scales by NaN, as torch does"
        if theirs is not None:
            torch.nn.utils.clip_grad_norm_(theirs, 1.0, p)
            for a, b in zip(grads_of(params), theirs):
                torch.testing.assert_close(local(a), local(b.grad), equal_nan=True, rtol=0, atol=0)
    model = fsdp_model(mesh)
    poison(list(model.parameters()), 0, math.inf)
    total = counted(gradfuse.clip_grad_norm_, model.parameters(), 1.0, collectives=1)
    assert float(local(total)) == math.inf
    for policy in ("skip", "zero", "error"):
        model = fsdp_model(mesh)
        params = list(model.parameters())
        poison(params, 1, math.nan)
        snapshot = [local(g).clone() for g in grads_of(params)]
        if policy == "error":
            for call in (lambda: gradfuse.clip_grads(params, 1.0, nonfinite="error"),
                         lambda: gradfuse.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)):  # fmt: skip
                try:
                    counted(call, collectives=1, syncs=1)
                except RuntimeError as e:
                    assert "non-finite" in str(e), e
                else:
                    raise AssertionError("nonfinite='error' did not raise on this rank")
        else:
            r = counted(gradfuse.clip_grads, params, 1.0, nonfinite=policy, collectives=1)
            assert float(r.found_inf) == 1.0, "found_inf must be set on every rank"
            same_on_every_rank(r.result, f"{policy}: result")
        for g, s in zip(grads_of(params), snapshot):
            if policy == "zero":
                assert (local(g) == 0).all(), "zero: every rank zeroes"
            else:
                torch.testing.assert_close(local(g), s, equal_nan=True, rtol=0, atol=0, msg=f"{policy}: changed")


@case(2)
def refusals_before_any_gradient_is_touched():
    mesh = init_device_mesh("cpu", (2,))
    h = torch.nn.Parameter(distribute_tensor(torch.zeros(3), mesh, [Replicate()]))
    h.grad = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    model = fsdp_model(mesh)
    params = list(model.parameters())
    snapshot = [local(g).clone() for g in grads_of(params)]
    plain = torch.nn.Parameter(torch.ones(2))
    plain.grad = torch.ones(2)
    lin = torch.nn.Linear(2, 2)
    lin(torch.ones(1, 2)).sum().backward()
    calls = {
        "Partial": (lambda: gradfuse.clip_grad_norm_(params + [h], 1.0), ValueError),
        "plain tensor among DTensor": (lambda: gradfuse.clip_grad_norm_(params + [plain], 1.0), RuntimeError),
        "exclude_from_norm": (lambda: gradfuse.clip_grad_norm_(lin.parameters(), 1.0, exclude_from_norm=[lin.bias]), ValueError),
        "ProcessGroup": (lambda: gradfuse.clip_grad_norm_(params, 1.0, group="world"), TypeError),
        "clip_grad_norm_per_tensor_: DTensor": (lambda: gradfuse.clip_grad_norm_per_tensor_(model, 1.0), ValueError),
        "adaptive_clip_grad_: DTensor": (lambda: gradfuse.adaptive_clip_grad_(model), ValueError),
    }
    for needle, (call, error) in calls.items():
        try:
            call()
        except error as e:
            assert needle in str(e), f"{needle!r} not in {e}"
        else:
            raise AssertionError(f"no {error.__name__} for {needle}")
    for g, s in zip(grads_of(params), snapshot):
        assert torch.equal(local(g), s)
    # An empty tensor has no inf norm (torch's error), judged by the global shape on every rank;
    # a shard empty on one rank only is fine (the fsdp2 case).
    e = torch.nn.Parameter(distribute_tensor(torch.zeros(0, 3), mesh, [Shard(0)]))
    e.grad = distribute_tensor(torch.zeros(0, 3), mesh, [Shard(0)])
    try:
        gradfuse.clip_grad_norm_([e], 1.0, math.inf)
    except RuntimeError as err:
        assert "identity" in str(err)
    else:
        raise AssertionError("an empty gradient at p=inf did not raise")


@case(2)
def return_types_and_the_two_step_clip():
    mesh = init_device_mesh("cpu", (2,))
    model = fsdp_model(mesh)
    params = list(model.parameters())
    grads = grads_of(params)
    theirs = holders(grads)
    ours = counted(gradfuse.get_total_norm, grads, collectives=1)
    want = torch.nn.utils.get_total_norm([q.grad for q in theirs])
    assert isinstance(ours, DTensor) and ours.placements == (Replicate(),) and ours.device_mesh == mesh
    assert_close(float(ours.full_tensor()), float(want.full_tensor()), 2e-6, "get_total_norm")
    r = counted(gradfuse.clip_grads, params, 1.0, apply=False, collectives=1)
    assert isinstance(r, gradfuse.DistributedClipResult) and type(r.total_norm) is torch.Tensor
    # torch's total (a DTensor) fed to gradfuse's scale step: the local shards scale by one factor
    gradfuse.clip_grads_with_norm_(params, 0.5 * float(ours.full_tensor()), want)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.5 * float(ours.full_tensor()), want)
    for a, b in zip(grads, theirs):
        torch.testing.assert_close(local(a), local(b.grad), rtol=2e-6, atol=0)


def _twin_fsdp(mesh, seed: int = 3):
    """Two identical FSDP2 models without gradients yet."""
    from torch.distributed.fsdp import fully_shard

    twins = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 7), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))
        fully_shard(model, mesh=mesh)
        twins.append(model)
    return twins


def _backward(models, scalers=None, poison_rank=None):
    torch.manual_seed(11 + dist.get_rank())
    x = torch.randn(8, 16)
    for i, model in enumerate(models):
        loss = model(x).square().sum()
        (scalers[i].scale(loss) if scalers else loss).backward()
        if poison_rank is not None:
            poison(list(model.parameters()), poison_rank, math.nan)


def _assert_same_params(a, b, what):
    for i, (x, y) in enumerate(zip(a.parameters(), b.parameters())):
        torch.testing.assert_close(local(x), local(y), rtol=2e-6, atol=1e-7, msg=lambda m: f"{what} {i}: {m}")


@case(2)
def sharded_grad_scaler_agrees_on_every_rank():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    mesh = init_device_mesh("cpu", (2,))
    ours, theirs = _twin_fsdp(mesh)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    scalers = [ShardedGradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step, poison_rank in enumerate((None, 1)):
        for o in opts:
            o.zero_grad()
        _backward((ours, theirs), scalers, poison_rank)
        before = [local(q).clone() for q in ours.parameters()]
        r = counted(gradfuse.unscale_and_clip_, scalers[0], opts[0], 0.05, collectives=1)
        scalers[1].unscale_(opts[1])
        if poison_rank is None:  # per-tensor norms of the unscaled local shards, as a local clip's
            want = torch.stack([local(q.grad).double().norm() for q in theirs.parameters()])
            torch.testing.assert_close(r.tensor_norms.double(), want, rtol=1e-6, atol=1e-12)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        for s, o in zip(scalers, opts):
            s.step(o)
            s.update()
        _assert_same_params(ours, theirs, f"step {step}")
        assert float(scalers[0].get_scale()) == float(scalers[1].get_scale()) == 2.0 ** (10 - step)
        if poison_rank is not None:  # skipped on every rank, not only on the poisoned one
            for q, b in zip(ours.parameters(), before):
                assert torch.equal(local(q), b)


@case(2)
def optimizer_entry_points_and_global_layer_norms():
    mesh = init_device_mesh("cpu", (2,))
    ours, theirs = _twin_fsdp(mesh)
    opts = [torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)]
    _backward((ours, theirs))
    counted(gradfuse.clip_grad_norm_for_optimizer_, opts[0], 0.05, collectives=1)
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
    for o in opts:
        o.step()
    _assert_same_params(ours, theirs, "clip_grad_norm_for_optimizer_")
    # fused AdamW takes the factor as grad_scale: no scale pass
    fused = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=True) for m in (ours, theirs)]
    for o in fused:
        o.zero_grad()
    _backward((ours, theirs))
    r = counted(gradfuse.clip_grad_norm_for_optimizer_, fused[0], 0.05, collectives=1)
    assert float(r.clip_coef) < 1
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
    for o in fused:
        o.step()
    _assert_same_params(ours, theirs, "handoff to fused AdamW")
    # Clipper: the global total always; the global per-layer norms for its history (one more collective)
    _backward((ours,))
    named = list(ours.named_parameters())
    layers = {n: norm64([full(q.grad)], 2.0) for n, q in named}
    total = norm64([full(q.grad) for _, q in named], 2.0)
    for layer_norms, collectives in ((False, 1), (None, 2)):
        history = gradfuse.NormHistory(4, parameters=named, layers="all")
        clipper = gradfuse.Clipper(named, torch.optim.SGD(ours.parameters(), lr=0.0), max_norm=1e9, nonfinite="propagate",
                                   history=history, layer_norms=layer_norms)  # fmt: skip
        counted(clipper.step, collectives=collectives)
        rec = history.records()
        assert_close(float(rec["total_norm"][-1]), total, TOTAL_RTOL, "Clipper total")
        got = dict(zip(history.layer_names, rec["layer_norms"][-1].tolist()))
        if layer_norms is None:
            for n, want in layers.items():
                assert_close(got[n], want, TOTAL_RTOL, f"layer {n}")
        else:
            assert all(math.isnan(v) for v in got.values()), "layer norms not gathered with layer_norms=False"
        same_on_every_rank(torch.tensor([float(rec["total_norm"][-1]), *got.values()]), "Clipper history")


# --------------------------------------------------------------------------------------------------
# Cases on 4 ranks


@case(4)
def hsdp_replicate_by_shard():
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for p in P_ALL:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 7), torch.nn.Linear(7, 1))
        fully_shard(model, mesh=mesh)
        torch.manual_seed(1 + dist.get_rank())
        model(torch.randn(8, 16)).square().sum().backward()
        assert model[0].weight.grad.placements == (Replicate(), Shard(0))
        check_clip(list(model.parameters()), p, torch_too=p not in (math.inf, -math.inf), what=f"hsdp p={p}")


@case(4)
def dp_by_tp_with_strided_shards():
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for p in P_ALL:
        block = tp_block(mesh["tp"], dp_mesh=mesh["dp"])
        kinds = {type(q.grad.placements[0]) for q in block.parameters()}
        assert _StridedShard in kinds, kinds
        check_clip(list(block.parameters()), p, torch_too=p not in (0.0, math.inf, -math.inf), what=f"dp x tp p={p}")


@case(4)
def mixed_meshes_dense_and_expert():
    dense_mesh = init_device_mesh("cpu", (4,))
    expert_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_mod_ep", "ep"))
    for p in P_ALL:
        model = fsdp_model(dense_mesh)
        torch.manual_seed(5)
        experts = []
        for shape, placements in (((4, 6, 5), [Shard(1), Shard(0)]), ((5, 4), [Replicate(), Replicate()]), ((4, 3), [Replicate(), Shard(0)])):
            q = torch.nn.Parameter(distribute_tensor(torch.zeros(shape), expert_mesh, placements))
            q.grad = distribute_tensor(torch.randn(shape) * 3, expert_mesh, placements)
            experts.append(q)
        # torch cannot stack norms from two meshes (pytorch#180346): the fp64 oracle only
        check_clip(list(model.parameters()) + experts, p, torch_too=False, what=f"dense + expert p={p}")


@case(4)
def pipeline_of_fsdp_stages_with_group():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage, dp_rank = mesh.get_coordinate()
    for p in P_ALL:
        model = fsdp_model(mesh["dp"], seed=stage, widths=(16, 7 + 2 * stage, 1))
        params = list(model.parameters())
        grads = grads_of(params)
        mine = [full(g) for g in grads]  # the stage's gradients, gathered over its dp mesh
        every = [None] * 4
        dist.all_gather_object(every, mine if dp_rank == 0 else [])
        want = norm64([g for part in every for g in part], p)
        max_norm = 0.5 * want if want and math.isfinite(want) else 1.0
        # p=0 sums each DTensor's count over its stage mesh first: one more collective
        total = counted(gradfuse.clip_grad_norm_, params, max_norm, p, collectives=2 if p == 0 else 1, group=dist.group.WORLD)
        same_on_every_rank(local(total), f"pp x fsdp p={p}")
        assert_close(float(local(total)), want, TOTAL_RTOL, f"pp x fsdp p={p}")
        assert_scaled([full(g) for g in grads], mine, coef64(want, max_norm), f"pp x fsdp p={p}")


@case(4)
def nan_on_one_rank_of_dp_by_tp_and_group_refusals():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for policy in ("skip", "zero"):
        block = tp_block(mesh["tp"], dp_mesh=mesh["dp"])
        params = list(block.parameters())
        poison(params, 3, math.nan)
        r = counted(gradfuse.clip_grads, params, 1.0, nonfinite=policy, collectives=1)
        assert float(r.found_inf) == 1.0
        if policy == "zero":
            assert all((local(g) == 0).all() for g in grads_of(params))
    # A rank set no mesh dimension spans gets a group of its own, created by its members alone, once.
    from gradfuse import _layout

    if dist.get_rank() in (0, 2):
        pair = _layout.group_for((0, 2), [])
        x = torch.ones(1)
        dist.all_reduce(x, group=pair)
        assert float(x) == 2.0 and _layout.group_for((0, 2), []) is pair
    sub = dist.new_group([0, 1])
    checks = [(lambda: gradfuse.clip_grad_norm_(params, 1.0, group=mesh), "1-D DeviceMesh")]
    checks.append((lambda: gradfuse.clip_grad_norm_(params, 1.0, group=sub), "not in the group" if dist.get_rank() < 2 else "not a member"))
    for call, needle in checks:
        try:
            call()
        except ValueError as e:
            assert needle in str(e), f"{needle!r} not in {e}"
        else:
            raise AssertionError(f"no ValueError ({needle})")


# --------------------------------------------------------------------------------------------------
# The runner


def run(rank: int, world: int, port: int, out: str) -> None:
    """One rank: join the group, run every case of ``world``, write the report (and the seconds)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    results = {"start-up s": time.monotonic() - started}
    try:
        for fn in CASES[world]:
            t0 = time.monotonic()
            try:
                fn()
                results[fn.__name__] = "ok"
            except Exception:
                results[fn.__name__] = traceback.format_exc()
            dist.barrier()
            results[f"{fn.__name__} s"] = time.monotonic() - t0
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
