"""Snapshots and rollback (gradfuse.rollback, Clipper(max_bad_steps=, rollback=)): restored state
equals the snapshot bitwise; a persistent explosion is rolled back, batches skipped, training
converges; without a rollback the clipper raises; the host learns it without a sync."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_clipper import cases
from test_training import SyncCounter

import gradfuse
from gradfuse.rollback import LaggedRead, Snapshots

STEPS = 70
LR = 0.02
BAD_LR_AT = 30  # one step at 200x the learning rate: the weights jump, every later norm is a spike

_gen = torch.Generator().manual_seed(11)
X = torch.randn(STEPS, 32, 6, generator=_gen)
W_TRUE = torch.randn(6, 1, generator=_gen)
Y = torch.tanh(X @ W_TRUE) + 0.05 * torch.randn(STEPS, 32, 1, generator=_gen)


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)


def _state_copy(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _assert_state_equal(model, opt, saved):
    params, state = saved
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach().cpu(), q.cpu())
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for k in state:
        for key, val in state[k].items():
            got = now[k][key]
            assert torch.equal(got.cpu(), val.cpu()) if isinstance(val, torch.Tensor) else got == val, (k, key)


def _train_steps(model, opt, steps, start=0):
    for i in range(start, start + steps):
        F.mse_loss(model(X[i].to(next(model.parameters()).device)), Y[i].to(next(model.parameters()).device)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["adamw-fused", "sgd-momentum"])
def test_restore_is_bitwise_the_snapshot(kind):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True) if kind == "adamw-fused" else torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    snaps = Snapshots(model, opt, keep=2)
    snaps.capture(0)  # an empty optimizer state: restoring it gives a fresh start
    _train_steps(model, opt, 5)
    snaps.capture(5)
    saved = _state_copy(model, opt)
    _train_steps(model, opt, 4, start=5)
    assert not torch.equal(next(model.parameters()), saved[0][0])
    state_tensors = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    assert snaps.restore(before=8) == 5
    _assert_state_equal(model, opt, saved)
    now = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    assert {id(t) for t in now} == {id(t) for t in state_tensors}  # restored in place (CUDA graphs keep their pointers)
    assert snaps.restore(before=4) == 0 and len(opt.state) == 0
    snaps.capture(9)
    snaps.capture(12)  # the ring holds two: 0 is gone
    assert snaps.steps() == [12, 9] and snaps.restore(before=8) is None


def _run(rollback=None, max_bad_steps=None, incident=True, backend=None, syncs=None, stop=STEPS):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    clipper = gradfuse.Clipper(model, opt, max_norm=1.0, spike=gradfuse.SpikeRule(sigma=6.0, window=16, warmup=8),
                               max_bad_steps=max_bad_steps, rollback=rollback, backend=backend)  # fmt: skip
    losses, skipped_batches, restored = [], [], None
    for i in range(stop):
        if clipper.skip_batch():
            skipped_batches.append(i)
            continue
        for group in opt.param_groups:
            group["lr"] = LR * (200 if incident and i == BAD_LR_AT else 1)
        loss = F.mse_loss(model(X[i]), Y[i])
        loss.backward()
        if syncs is not None:
            with syncs:
                clipper.step(loss)
        else:
            clipper.step(loss)
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if clipper.last_rollback is not None and restored is None:
            restored = (i, clipper.last_rollback, _state_copy(model, opt))
    return clipper, losses, skipped_batches, restored, (model, opt)


@pytest.mark.parametrize("backend, run", cases(["rollback"], []))
def test_persistent_explosion_is_rolled_back_then_training_converges(backend, run):
    clean = _run(incident=False, backend=backend)[1]
    rollback = gradfuse.Rollback(every=10, keep=2, skip_batches=5)
    clipper, losses, skipped, restored, _ = _run(rollback, max_bad_steps=4, backend=backend)
    counts = clipper.stats()
    assert counts["rollbacks"] == 1 and clipper.rollbacks == 1
    at, info, _ = restored
    # the bad step (30) is taken, steps 31-34 are spikes, skipped; the host sees 4 in a row after 34
    assert at == BAD_LR_AT + 4 and info == {"detected_at": 35, "restored": 30}
    assert skipped == list(range(at + 1, at + 6))
    assert counts["spike_steps"] == 4 and counts["skipped_steps"] == 4 and counts["consecutive_bad"] == 0
    bad = slice(BAD_LR_AT + 1, BAD_LR_AT + 5)
    assert min(losses[bad]) > 5 * max(clean[bad])  # it did explode
    final, final_clean = sum(losses[-5:]) / 5, sum(clean[-5:]) / 5
    assert final < 0.5 * losses[0] and final < 2 * final_clean  # and then converged


def test_rollback_restores_the_snapshot_bitwise_and_costs_no_sync():
    """Right after the rollback the state is, bit for bit, that of the same run without the incident
    after step 30 (the snapshot); the clipper's steps, snapshots and explosion check included, read
    nothing from the device (the loop's own float(loss) is outside the count)."""
    syncs = SyncCounter()
    _, _, _, (_, info, after), _ = _run(gradfuse.Rollback(every=10, keep=2), max_bad_steps=4, backend="cpu", syncs=syncs)
    assert syncs.count == 0
    *_, (model, opt) = _run(incident=False, backend="cpu", stop=info["restored"])
    _assert_state_equal(model, opt, after)


def test_persistent_explosion_without_rollback_raises():
    with pytest.raises(RuntimeError, match="4 skipped or non-finite steps in a row .* a persistent explosion"):
        _run(None, max_bad_steps=4)


def test_max_rollbacks_then_raises():
    with pytest.raises(RuntimeError, match="after 0 rollbacks"):
        _run(gradfuse.Rollback(every=10, max_rollbacks=0), max_bad_steps=4)


def test_lagged_read_on_cpu_is_immediate_and_a_copy():
    t = torch.tensor([3, 4])
    read = LaggedRead()
    assert read.latest() is None
    read.start(t)
    t.add_(1)
    assert read.latest().tolist() == [3, 4]


@pytest.mark.gpu
def test_snapshots_on_cuda_are_pinned_async_and_bitwise():
    model = _model("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    snaps = Snapshots(model, opt, keep=2)
    _train_steps(model, opt, 3)
    snaps.capture(3)
    saved = _state_copy(model, opt)
    assert all(h.is_pinned() for h in snaps._slots[0].host)
    snaps.before_update()  # the next update waits on the device for the copy
    _train_steps(model, opt, 3, start=3)
    assert snaps.restore(before=5) == 3
    _assert_state_equal(model, opt, saved)
    read = LaggedRead(lag=2)
    counts = torch.zeros(4, dtype=torch.int64, device="cuda")
    seen = []
    for _ in range(4):
        counts.add_(1)
        read.start(counts)
        latest = read.latest()
        seen.append(None if latest is None else int(latest[0]))
    assert seen == [None, None, 1, 2]  # two steps late, whatever the device's pace
