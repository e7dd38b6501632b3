"""The trainer recipes of the README ("Use it in your trainer"), with the real packages: Hugging Face
Trainer (through accelerate) on a tiny GPT-2 built from a config, and Lightning's gradient_clip_val
(norm and value), each against the same run with torch's own clipping. Nothing is downloaded.

The packages come with the ``integrations`` extra (CI installs it); without them these tests skip.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import gradfuse
from gradfuse import _engine
from gradfuse import clip as gradfuse_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STEPS = 4
TORCH_GET_TOTAL_NORM = torch.nn.utils.get_total_norm  # torch's own, taken before any patch


@pytest.fixture
def engine_calls(monkeypatch):
    """How many clips went through gradfuse's engine (a pass-through counter)."""
    calls = []
    real = _engine.clip
    monkeypatch.setattr(_engine, "clip", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def value_calls(monkeypatch):
    """How many clamps gradfuse's clip_grad_value_ made (a pass-through counter)."""
    calls = []
    real = gradfuse_clip._torch_clip_grad_value_
    monkeypatch.setattr(gradfuse_clip, "_torch_clip_grad_value_", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# --------------------------------------------------------------------------------------------------
# Hugging Face Trainer (accelerate underneath)


def _hf_grad_norms(tmp_path, routed: bool) -> list[float]:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=97)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(STEPS * 4):
        ids = torch.randint(0, config.vocab_size, (16,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1, max_grad_norm=0.5,
        learning_rate=1e-3, seed=0, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    if routed:
        with gradfuse.patch_torch():  # the README's one line
            trainer.train()
    else:
        trainer.train()
    return [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]


def test_hf_trainer_logs_the_same_grad_norm_through_gradfuse(tmp_path, engine_calls):
    torch_norms = _hf_grad_norms(tmp_path / "torch", routed=False)
    assert not engine_calls
    ours = _hf_grad_norms(tmp_path / "gradfuse", routed=True)
    assert len(engine_calls) == STEPS  # every step's clip went through gradfuse
    assert len(ours) == len(torch_norms) == STEPS
    assert all(n > 0.5 for n in torch_norms)  # max_grad_norm 0.5: every step really clipped
    assert ours == pytest.approx(torch_norms, rel=1e-5)
    assert torch.nn.utils.clip_grad_norm_ is not gradfuse.clip_grad_norm_  # the patch ended with the block


# --------------------------------------------------------------------------------------------------
# Lightning


def _lightning_module(kind: str):
    L = pytest.importorskip("lightning.pytorch")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
            self.torch_norms: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):  # before Lightning clips: the norm torch would see
            self.torch_norms.append(float(TORCH_GET_TOTAL_NORM([p.grad for p in self.parameters()])))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class WithGradfuse(Tiny):
        """The README's recipe: gradient_clip_val through gradfuse, the norm logged."""

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            if not gradient_clip_val:
                return
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                gradfuse.clip_grad_value_(params, gradient_clip_val)
            else:
                self.log("grad_norm", gradfuse.clip_grad_norm_(params, gradient_clip_val))

    return L, (WithGradfuse if kind == "hook" else Tiny)()


def _lightning_fit(tmp_path, kind: str, algorithm: str):
    """kind: "torch" (Lightning's own clipping), "patch" (gradfuse.patch_torch()), "hook" (the recipe)."""
    L, module = _lightning_module(kind)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8 * STEPS, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, (x.sum(1, keepdim=True) * 3).tanh() * 5)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        gradient_clip_val=0.05 if algorithm == "norm" else 0.01, gradient_clip_algorithm=algorithm,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers and similar advice
        if kind == "patch":
            with gradfuse.patch_torch():
                trainer.fit(module, loader)
        else:
            trainer.fit(module, loader)
    return trainer, module


@pytest.mark.parametrize("kind", ["patch", "hook"])
def test_lightning_gradient_clip_val_norm_through_gradfuse(tmp_path, kind, engine_calls):
    _, reference = _lightning_fit(tmp_path / "torch", "torch", "norm")
    assert not engine_calls
    trainer, ours = _lightning_fit(tmp_path / kind, kind, "norm")
    assert len(engine_calls) == STEPS
    assert all(n > 0.05 for n in reference.torch_norms)  # every step really clipped
    assert ours.torch_norms == pytest.approx(reference.torch_norms, rel=1e-5)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if kind == "hook":  # the recipe logs the norm gradfuse computed, that of the last step here
        assert float(trainer.callback_metrics["grad_norm"]) == pytest.approx(reference.torch_norms[-1], rel=1e-5)


@pytest.mark.parametrize("kind", ["patch", "hook"])
def test_lightning_gradient_clip_val_value_through_gradfuse(tmp_path, kind, value_calls):
    _, reference = _lightning_fit(tmp_path / "torch", "torch", "value")
    assert not value_calls
    _, ours = _lightning_fit(tmp_path / kind, kind, "value")
    assert len(value_calls) == STEPS
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)  # the same clamp: the same bits
