"""MIL heads: shapes, attention normalisation, tiny and huge bags, any D from 64 to 4096."""

from __future__ import annotations

import pytest
import torch

from melanoma_mil.config import ModelConfig
from melanoma_mil.models import build_model
from melanoma_mil.models.mil import Dropout


@pytest.mark.parametrize("name", ["gated_attention", "clam_sb", "mean", "max"])
@pytest.mark.parametrize(("n", "d"), [(1, 64), (7, 4096), (300, 1024)])
def test_forward_shapes_and_attention_sums_to_one(name: str, n: int, d: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), d, 2).eval()
    out = model(torch.randn(n, d))
    assert out.logits.shape == (2,)
    assert out.attention.shape == (n,)
    assert torch.isclose(out.attention.sum(), torch.tensor(1.0), atol=1e-5)
    assert (out.attention >= 0).all()


@pytest.mark.parametrize("n", [1, 2, 3, 9])
def test_clam_instance_loss_on_bags_smaller_than_k(n: int) -> None:
    model = build_model(ModelConfig(name="clam_sb", k_sample=8), 32, 2).train()
    out = model(torch.randn(n, 32), torch.tensor(1))
    assert out.instance_loss is not None and torch.isfinite(out.instance_loss)
    out.logits.sum().add(out.instance_loss).backward()  # gradients flow for every bag size


def test_hundred_thousand_instances() -> None:
    model = build_model(ModelConfig(), 64, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(100_000, 64))
    assert out.logits.shape == (3,) and torch.isfinite(out.attention).all()


def test_gated_attention_focuses_on_the_key_instance() -> None:
    """One informative instance among noise gets the attention after a few steps of training."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0), 8, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    key = torch.zeros(8)
    key[0] = 6.0
    for step in range(150):
        bag = torch.randn(20, 8)
        label = step % 2
        if label:
            bag[0] += key
        loss = torch.nn.functional.cross_entropy(model(bag).logits[None], torch.tensor([label]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    bag = torch.randn(20, 8)
    bag[5] += key
    assert model.eval()(bag).attention.argmax().item() == 5


def test_unknown_model_name() -> None:
    from melanoma_mil.errors import UserError

    with pytest.raises(UserError, match="model.name"):
        build_model(ModelConfig(name="transmil"), 16, 2)


def test_cpu_dropout_drops_p_scales_survivors_and_is_seeded() -> None:
    drop = Dropout(0.25)
    x = torch.ones(2000, 512, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)  # gradient flows through survivors only
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
