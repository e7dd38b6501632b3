"""Test setup for gradfuse: fixtures and hooks only (the helpers tests import are in helpers.py).

* Without a CUDA device, the Triton kernels run on CPU tensors through Triton's interpreter:
  ``TRITON_INTERPRET=1`` must be set before anything imports triton (``triton.jit`` reads it when a
  kernel is decorated), so it is set here, at conftest import, before gradfuse is imported.
* ``GRADFUSE_TEST_REQUIRE=cpu,triton`` (CI) names backends that must run here: one that cannot is
  a usage error at session start, with the reason, instead of more skips.
* Tests marked ``gpu`` (markers are declared in pyproject.toml) skip cleanly without a CUDA device.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import (  # noqa: E402  (after TRITON_INTERPRET: importing gradfuse imports triton)
    BACKENDS_CPU,
    BACKENDS_GPU,
    CPU_BACKEND_REASONS,
    CPU_BACKENDS,
    FUSED_CPU_BACKENDS,
    HAS_CUDA,
    required_backend_errors,
)

from gradfuse import _backends  # noqa: E402

REQUIRE_VAR = "GRADFUSE_TEST_REQUIRE"


def pytest_configure(config):
    required = [n.strip() for n in os.environ.get(REQUIRE_VAR, "").split(",") if n.strip()]
    errors = required_backend_errors(required)
    if errors:
        raise pytest.UsageError(f"{REQUIRE_VAR}={os.environ[REQUIRE_VAR]} names backends the tests cannot run: " + " | ".join(errors))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    lines = [f"gradfuse backends for CPU tensors: {', '.join(BACKENDS_CPU)}"]
    for name, reason in CPU_BACKEND_REASONS.items():
        if reason is not None:
            lines.append(f"  {name}: unavailable ({reason})")
    lines.append(f"CUDA: {HAS_CUDA}; GPU backends: {', '.join(BACKENDS_GPU) or 'none'}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
    return lines


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    """A backend name that runs on CPU tensors here."""
    return request.param


@pytest.fixture(params=FUSED_CPU_BACKENDS)
def fused_backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """No test inherits GRADFUSE_BACKEND from the shell (tests that need it set it themselves)."""
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
