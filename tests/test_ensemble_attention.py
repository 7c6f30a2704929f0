"""Ensembles (model.members, fold models) draw one class: models with one attention map per class
(clam_mb, dsmil) give every member's and fold's map of the ensemble's predicted class."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from melanoma_mil.config import ModelConfig
from melanoma_mil.inference.ensemble import fold_outputs
from melanoma_mil.models import MILOutput, build_model

PER_CLASS = ("clam_mb", "dsmil")
D = 32


def own_classes(outs: list[MILOutput]) -> list[int]:
    return [int(o.logits.argmax()) for o in outs]


def disagreeing_bag(outputs: Callable[[torch.Tensor], list[MILOutput]]) -> torch.Tensor:
    """A random bag on which the models of ``outputs(x)`` predict different classes."""
    for _ in range(500):
        x = torch.randn(50, D)
        if len(set(own_classes(outputs(x)))) > 1:
            return x
    pytest.fail("no bag on which the models disagree")


@pytest.mark.parametrize("name", PER_CLASS)
@torch.no_grad()
def test_members_draw_their_map_of_the_ensemble_class_when_they_disagree(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, members=3), D, 2).eval()
    x = disagreeing_bag(model.member_outputs)
    outs = model.member_outputs(x)
    out = model(x)
    cls = int(out.logits.argmax())
    for o, own in zip(outs, own_classes(outs), strict=True):
        assert o.class_attention is not None and o.class_attention.shape == (50, 2)
        assert o.class_attention.dtype == torch.float32
        torch.testing.assert_close(o.class_attention.sum(0), torch.ones(2))
        torch.testing.assert_close(o.attention, o.class_attention[:, own])  # alone: its own class
    want = torch.stack([o.class_attention[:, cls] for o in outs]).mean(0)
    torch.testing.assert_close(out.attention, want)
    mixed = torch.stack([o.attention for o in outs]).mean(0)  # each member's own class
    assert not torch.allclose(out.attention, mixed)
    torch.testing.assert_close(
        out.class_attention, torch.stack([o.class_attention for o in outs]).mean(0)
    )


@pytest.mark.parametrize("name", PER_CLASS)
@torch.no_grad()
def test_folds_draw_their_map_of_the_fold_mean_class_when_they_disagree(name: str) -> None:
    """Fold models as `predict`/`heatmap` load them, one of them a member ensemble."""
    torch.manual_seed(1)
    folds: list[nn.Module] = [
        build_model(ModelConfig(name=name, members=m), D, 2).eval() for m in (1, 1, 2)
    ]
    x = disagreeing_bag(lambda b: [f(b) for f in folds])
    outs = [f(x) for f in folds]
    probs, attention = fold_outputs(folds, x)
    cls = int(probs.mean(0).argmax())
    want = torch.stack([o.class_attention[:, cls] for o in outs])
    torch.testing.assert_close(attention, want)
    assert not torch.allclose(attention, torch.stack([o.attention for o in outs]))
    torch.testing.assert_close(probs, torch.stack([o.logits.softmax(-1) for o in outs]))
    for threshold in (1e-9, 1 - 1e-9):  # predict threshold=T moves the ensemble's class
        _, attention = fold_outputs(folds, x, threshold)
        cls = int(probs.mean(0)[1] >= threshold)
        torch.testing.assert_close(
            attention, torch.stack([o.class_attention[:, cls] for o in outs])
        )


@pytest.mark.parametrize("name", ["gated_attention", "clam_sb", "transmil", "topk"])
@torch.no_grad()
def test_models_with_one_map_average_it_unchanged(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, members=3), D, 2).eval()
    x = torch.randn(40, D)
    outs = model.member_outputs(x)
    out = model(x)
    assert out.class_attention is None
    torch.testing.assert_close(out.attention, torch.stack([o.attention for o in outs]).mean(0))
    _, attention = fold_outputs(list(model.members), x)
    torch.testing.assert_close(attention, torch.stack([o.attention for o in outs]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only seen on a GPU")
@pytest.mark.parametrize("name", PER_CLASS)
def test_a_training_step_never_reads_the_predicted_class_on_the_host(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, members=2), D, 2).cuda().train()
    x, label = torch.randn(50, D, device="cuda"), torch.tensor(1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for out in model.member_outputs(x, label):
            assert out.attention.shape == (50,)
        out = model(x)  # the ensemble's class, picked on the device too
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.attention.shape == (50,)
