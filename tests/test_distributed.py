"""DTensor gradients (FSDP2, tensor parallel): routed to the reference path, with torch's results.

One process, a one-rank gloo group on the CPU: enough to exercise DTensor dispatch of every op the
reference path runs (foreach norms, stack, the scale) and the type of what comes back.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import gradfuse

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _dtensor_params(mesh, seed: int, poison: float | None = None):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, (shape, placement) in enumerate((((8, 4), Shard(0)), ((5,), Replicate()), ((3, 6), Shard(1)))):
        grad = torch.randn(shape, generator=gen) * 3
        if poison is not None and i == 1:
            grad[2] = poison
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, [placement]))
        p.grad = distribute_tensor(grad, mesh, [placement])
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_dtensor_grads_clip_like_torch(mesh, norm_type, max_norm):
    from torch.distributed.tensor import DTensor

    ours, theirs = _dtensor_params(mesh, 0), _dtensor_params(mesh, 0)
    got = gradfuse.clip_grad_norm_(ours, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert isinstance(got, DTensor) and isinstance(want, DTensor)
    torch.testing.assert_close(got.full_tensor(), want.full_tensor(), rtol=2e-6, atol=0)
    for a, b in zip(ours, theirs):
        assert isinstance(a.grad, DTensor) and a.grad.placements == b.grad.placements
        torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=4e-6, atol=0)


def test_dtensor_grads_take_the_reference_path_with_device_results(mesh):
    from torch.distributed.tensor import DTensor

    params = _dtensor_params(mesh, 1, poison=math.nan)
    before = [p.grad.full_tensor().clone() for p in params]
    res = gradfuse.clip_grads(params, 1.0, nonfinite="skip")
    assert res.backend == "torch"
    assert isinstance(res.found_inf, DTensor) and float(res.found_inf.full_tensor()) == 1.0
    for p, b in zip(params, before):  # skip: nothing touched
        torch.testing.assert_close(p.grad.full_tensor(), b, equal_nan=True, rtol=0, atol=0)
