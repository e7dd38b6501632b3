"""Distributed clipping on real process groups: gloo on 127.0.0.1, one spawn per world size.

Each world size (2 and 4 ranks) is one spawn that runs every case of ``tests/dist_cases.py`` in
its ranks (DDP, FSDP2 with uneven and empty shards, TP + Replicate, HSDP, dp x tp, dense + expert
meshes, pipeline stages through ``group=``, every p, fp32 and bf16, NaN on one rank under every
policy, the training entry points); here each case is one test reading what every rank reported.
The process group has a 30 s timeout so a hang fails fast, and every process is ended.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_cases

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

SPAWN_TIMEOUT_S = 240  # start-up (10-25 s per spawn on 2 cores) plus every case


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out: str) -> dict[int, dict[str, str]]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=dist_cases.run, args=(r, world, port, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # a rank still running after the deadline is hung: end it
            if p.is_alive():
                p.kill()
                p.join()
    reports = {}
    for r in range(world):
        path = os.path.join(out, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                reports[r] = json.load(f)
    return reports


_REPORTS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    def get(world: int) -> dict[int, dict[str, str]]:
        if world not in _REPORTS:
            _REPORTS[world] = _spawn(world, str(tmp_path_factory.mktemp(f"world{world}")))
        return _REPORTS[world]

    return get


@pytest.mark.parametrize(
    "world,name", [pytest.param(w, n, id=f"{w}ranks-{n}") for w in (2, 4) for n in dist_cases.names(w)]
)
def test_case(reports, world, name):
    got = reports(world)
    missing = [r for r in range(world) if name not in got.get(r, {})]
    assert not missing, f"ranks {missing} did not report {name} (crashed or hung: see the ranks' output)"
    failures = {r: got[r][name] for r in range(world) if got[r][name] != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())
