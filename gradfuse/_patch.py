"""``gradfuse.patch_torch()``: route torch's own clipping functions through gradfuse.

Trainers (Hugging Face ``Trainer`` through accelerate, Lightning's ``gradient_clip_val``) call
``torch.nn.utils.clip_grad_norm_`` and friends by attribute at every step, so replacing those
attributes sends them to gradfuse with no change to the trainer. gradfuse itself never calls these
attributes (``clip.py`` keeps its own reference to torch's ``clip_grad_value_``), so a patched torch
cannot recurse into gradfuse.
"""

from __future__ import annotations

import threading

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import clip

# torch's names that gradfuse replaces, in both modules trainers import them from; a name a module
# does not have (older torch, or torch.nn.utils.clip_grad's private spellings) is left alone.
PATCHED_NAMES = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
PATCHED_MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)

_lock = threading.Lock()
_active: list[TorchPatch] = []  # handles not undone yet; torch is patched while there is one
_saved: dict[tuple[object, str], object] = {}  # (module, name) -> what it held before the patch


class TorchPatch:
    """The handle :func:`patch_torch` returns: ``undo()`` (or leaving its ``with`` block) ends it.

    torch's functions come back, the very objects that were there before, once every handle taken
    is undone, so nested or repeated ``patch_torch()`` calls compose.
    """

    def __init__(self):
        self.active = True

    def undo(self) -> None:
        """Hand this patch back (again: nothing); the last one restores torch's functions."""
        with _lock:
            if not self.active:
                return
            self.active = False
            _active.remove(self)
            if not _active:
                _restore()

    def __enter__(self) -> TorchPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<gradfuse.TorchPatch {'active' if self.active else 'undone'}>"


def _targets():
    for module in PATCHED_MODULES:
        for name in PATCHED_NAMES:
            if hasattr(module, name):
                yield module, name


def _restore() -> None:
    for (module, name), original in _saved.items():
        if getattr(module, name) is getattr(clip, name):  # replaced since by someone else: theirs stays
            setattr(module, name, original)
    _saved.clear()


def patch_torch() -> TorchPatch:
    """Route ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_norm``, ``clip_grad_value_``,
    ``get_total_norm`` and ``clip_grads_with_norm_`` (and the same names in
    ``torch.nn.utils.clip_grad``) through gradfuse's drop-ins, until the returned handle is undone.

    Idempotent: a second call while patched changes nothing and returns a handle of its own.
    Code that took a reference before the patch (``from torch.nn.utils import clip_grad_norm_`` at
    import) keeps torch's function; trainers that look the name up at each step are routed.

        patch = gradfuse.patch_torch()      # or: with gradfuse.patch_torch(): trainer.train()
        trainer.train()
        patch.undo()
    """
    with _lock:
        if not _active:
            for module, name in _targets():
                _saved[(module, name)] = getattr(module, name)
                setattr(module, name, getattr(clip, name))
        handle = TorchPatch()
        _active.append(handle)
    return handle
