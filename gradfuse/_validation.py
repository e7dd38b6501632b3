"""Argument checks for the public functions: every bad input fails here, before any gradient is read
or written, with an error that names the argument and the problem."""

from __future__ import annotations

import math
import numbers
import operator
import types
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from . import _abi


class NotATensorError(TypeError, AttributeError):
    """An item that must be a tensor is not. Also an AttributeError, the type torch raises there
    (reading ``.grad`` or ``.device`` of it), so code written against torch still catches it."""


class GradDtypeError(TypeError, RuntimeError):
    """A gradient of a dtype no norm exists for (integer, bool). Also a RuntimeError, the type
    torch's kernels raise for it."""


def as_list(parameters, fn: str, *, warn_empty_generator: bool = False) -> list:
    """torch's input forms: one tensor, or any iterable (listed once, so generators work)."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if not isinstance(parameters, Iterable):
        raise TypeError(f"{fn}: parameters must be a tensor or an iterable of tensors, not {type(parameters).__name__}")
    is_generator = isinstance(parameters, types.GeneratorType)
    items = list(parameters)
    if warn_empty_generator and is_generator and not items:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=4)
    return items


def _not_a_tensor(items: list, fn: str, label: str = "parameters[{}]") -> NotATensorError:
    """The error for the first item of ``items`` that is not a tensor (``label`` names it by index)."""
    i, item = next((i, x) for i, x in enumerate(items) if not isinstance(x, torch.Tensor))
    return NotATensorError(f"{fn}: {label.format(i)} is of type {type(item).__name__}, not a torch.Tensor")


_GRAD = operator.attrgetter("grad")
DTYPE = operator.attrgetter("dtype")


def grads_of(parameters: list, fn: str) -> list[torch.Tensor]:
    """The gradients to clip: ``p.grad`` of every parameter that has one. (Runs every step, so
    the items are checked to be tensors only when reading ``.grad`` fails.)"""
    if torch.compiler.is_compiling():  # dynamo traces comprehensions, not attrgetter
        return [p.grad for p in parameters if p.grad is not None]
    try:
        return [g for g in map(_GRAD, parameters) if g is not None]
    except AttributeError:
        raise _not_a_tensor(parameters, fn) from None


def check_tensors(tensors: list, fn: str) -> list[torch.Tensor]:
    """get_total_norm takes gradients themselves: every item must be a tensor."""
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            hint = " (pass gradients, e.g. [p.grad for p in params if p.grad is not None])" if t is None else ""
            raise NotATensorError(f"{fn}: tensors[{i}] is of type {type(t).__name__}, not a torch.Tensor{hint}")
    return tensors


def _as_float(value, name: str, fn: str) -> float:
    if isinstance(value, str):
        try:
            return float(value)  # torch accepts 'inf'
        except ValueError:
            raise ValueError(f"{fn}: {name} must be a number, got the string {value!r}") from None  # torch's type
    if isinstance(value, np.ndarray):  # torch takes a 0-d array (np.array(1.0)) through float()
        if value.ndim != 0:
            raise TypeError(f"{fn}: {name} must be a number or a 0-d array, got an array of shape {list(value.shape)}")
        value = value[()]  # the numpy scalar, checked below like any number
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a number or a one-element tensor, got shape {list(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, not {type(value).__name__}")
    return float(value)


def check_max_norm(max_norm, fn: str) -> float | torch.Tensor:
    """A non-negative number (inf allowed). A one-element real tensor on a GPU stays there, read
    by the kernels on the device with no host sync (its value is not checked)."""
    if isinstance(max_norm, torch.Tensor) and max_norm.device.type != "cpu":
        if max_norm.numel() != 1 or max_norm.is_complex() or max_norm.dtype == torch.bool:
            raise ValueError(f"{fn}: max_norm must be a one-element real tensor, got {max_norm.dtype} of shape {list(max_norm.shape)}")
        return max_norm.detach().reshape(())  # an integer one too, as torch takes it
    value = _as_float(max_norm, "max_norm", fn)
    if math.isnan(value):
        raise ValueError(f"{fn}: max_norm is NaN")
    if value < 0:
        raise ValueError(f"{fn}: max_norm must be >= 0, got {value} (a negative max_norm would flip the gradients' sign)")
    return value


def check_clip_value(clip_value, fn: str) -> float:
    value = _as_float(clip_value, "clip_value", fn)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{fn}: clip_value must be a number >= 0, got {value}")
    return value


def check_norm_type(norm_type, fn: str) -> float:
    value = _as_float(norm_type, "norm_type", fn)
    if math.isnan(value):
        raise ValueError(f"{fn}: norm_type is NaN")
    return value


def check_grads(grads: list[torch.Tensor], p: float, foreach: bool | None, fn: str) -> tuple[torch.dtype, ...]:
    """Dtypes a norm exists for, and torch's errors for norms of empty tensors that have no identity.
    Returns the gradients' dtypes (the engine reuses them)."""
    try:
        dtypes = tuple(g.dtype for g in grads) if torch.compiler.is_compiling() else tuple(map(DTYPE, grads))
    except AttributeError:  # an object whose .grad is not a tensor
        raise _not_a_tensor(grads, fn, "gradient {}") from None
    for dtype in set(dtypes):
        if not (dtype.is_floating_point or dtype.is_complex):
            i = dtypes.index(dtype)
            raise GradDtypeError(f"{fn}: gradient {i} has dtype {dtype}; clipping needs floating-point or complex gradients")
    if p == math.inf or p < 0:
        for g in grads:
            if g.numel() == 0:
                if p == math.inf and foreach is not False and g.device.type in ("cpu", "cuda"):
                    raise RuntimeError(
                        "_foreach_norm cannot compute the infinity norm on an empty tensor because the "
                        "operation does not have an identity"
                    )
                raise RuntimeError(
                    f"linalg.vector_norm cannot compute the {p:g} norm on an empty tensor because the "
                    "operation does not have an identity"
                )
    return dtypes


def check_total_norm(total_norm, fn: str) -> torch.Tensor:
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"{fn}: total_norm must be a 0-dim tensor (as get_total_norm returns), not {type(total_norm).__name__}")
    if total_norm.dim() != 0:
        raise RuntimeError(f"{fn}: total_norm must be a 0-dim tensor (as get_total_norm returns), got shape {list(total_norm.shape)}")
    if not total_norm.is_floating_point():
        raise TypeError(f"{fn}: total_norm must be a floating-point tensor, got {total_norm.dtype}")
    return total_norm


NONFINITE_POLICIES = ("propagate", "skip", "zero", "error")
# The kernel policy of each ("error" measures as "propagate", then raises before any write).
_KERNEL_POLICY = {"propagate": _abi.POLICY_PROPAGATE, "skip": _abi.POLICY_SKIP, "zero": _abi.POLICY_ZERO, "error": _abi.POLICY_PROPAGATE}


def policy_of(nonfinite: str) -> int:
    """The kernel policy (``gradfuse._abi.POLICY_*``) of a validated ``nonfinite``."""
    return _KERNEL_POLICY[nonfinite]


def check_nonfinite(nonfinite: str, fn: str) -> str:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{fn}: nonfinite={nonfinite!r}; choose one of {', '.join(map(repr, NONFINITE_POLICIES))}")
    return nonfinite


def real_setting(owner: str, name: str, value, *, low: float, high: float = math.inf, low_open: bool = True, high_open: bool = False) -> float:
    """A setting as a float inside the interval: TypeError for a non-number (a bool included),
    ValueError, naming the setting and the interval, for one outside it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, not {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value}")
    return value


def count_setting(owner: str, name: str, value, low: int = 1) -> int:
    """A whole-number setting >= ``low``: TypeError for a non-integer, ValueError below ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer >= {low}, not {type(value).__name__}")
    if value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)
