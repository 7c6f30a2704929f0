"""MIL heads: one registry, output contract, DDP-safe gradients, planted-signal learnability,
tiny and huge bags, bf16 autocast, and TransMIL's Nystrom attention against exact attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from melanoma_mil.config import MODEL_NAMES, FitConfig, ModelConfig, load_config
from melanoma_mil.data.bags import read_bag
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.errors import UserError
from melanoma_mil.models import MODELS, build_model, feature_norm, set_progress
from melanoma_mil.models.common import CHUNK, Dropout
from melanoma_mil.models.transmil import NystromAttention, landmarks, pinv
from melanoma_mil.training.cv import run_fit


def test_registry_holds_exactly_the_config_choices() -> None:
    assert tuple(MODELS) == MODEL_NAMES
    assert set(MODEL_NAMES) >= {"abmil", "clam_mb", "transmil", "dsmil", "topk"}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("n", "d"), [(1, 64), (7, 4096), (300, 1024)])
def test_forward_shapes_and_attention_sums_to_one(name: str, n: int, d: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), d, 2).eval()
    out = model(torch.randn(n, d))
    assert out.logits.shape == (2,)
    assert out.attention.shape == (n,) and out.attention.dtype == torch.float32
    assert torch.isclose(out.attention.sum(), torch.tensor(1.0), atol=1e-5)
    assert (out.attention > 0).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("n", [1, 2, 3, 40])
def test_every_parameter_gets_a_gradient_in_a_training_step(name: str, n: int) -> None:
    """DDP (find_unused_parameters=False) needs a gradient for every parameter, every step,
    including bags too small for an instance loss."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, k_sample=8), 16, 3).train()
    out = model(torch.randn(n, 16), torch.tensor(2))
    loss = F.cross_entropy(out.logits[None], torch.tensor([2]))
    if out.instance_loss is not None:
        assert torch.isfinite(out.instance_loss)
        loss = loss + out.instance_loss
    loss.backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing} on a {n}-tile bag"


@pytest.mark.parametrize(
    ("epoch", "epochs", "trained"), [(0, 30, 40), (2, 30, 40), (3, 30, 1), (0, 9, 1)]
)
def test_topk_trains_every_tile_in_its_warm_up_then_only_the_top_one(
    epoch: int, epochs: int, trained: int
) -> None:
    """model.topk_warmup=0.1: the first floor(0.1 x epochs) epochs train on the mean of all tile
    logits, so the deciding tiles can rank on top; afterwards only the top tile is trained."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="topk", topk_warmup=0.1), 16, 2).train()
    set_progress(model, epoch, epochs)
    x = torch.randn(40, 16, requires_grad=True)
    F.cross_entropy(model(x).logits[None], torch.tensor([1])).backward()
    assert int((x.grad.abs().sum(1) > 0).sum()) == trained
    model.eval()  # prediction is the top tile's, warm-up or not
    set_progress(model, 0, 30)
    with torch.no_grad():
        top = model(x.detach()).logits
        set_progress(model, 29, 30)
        assert torch.equal(top, model(x.detach()).logits)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list, list, list]:
    """120 bags, 16-d: positive bags hide 3 key tiles shifted by 4 along one direction."""
    features, labels = make_bag_cohort(
        tmp_path_factory.mktemp("planted"),
        n_patients=120,
        dim=16,
        n_instances=(8, 24),
        shift=4.0,
        dtype="float32",
    )
    df = pd.read_csv(labels)
    bags = [torch.from_numpy(read_bag(features / f"{s}.h5")[0]) for s in df["slide_id"]]
    y = (df["label"] == "immune_high").astype(int).tolist()
    return bags[:80], y[:80], bags[80:], y[80:]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_learns_planted_key_instances(name: str, planted, one_thread) -> None:
    """A short plain-torch training (the loss `fit` uses) reaches AUC >= 0.95 on held-out bags."""
    train_x, train_y, test_x, test_y = planted
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, hidden_dim=64, attention_dim=32)
    model = build_model(cfg, 16, 2)
    feature_norm(model).fit_stats(train_x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(4):
        for i in torch.randperm(len(train_x)).tolist():
            y = torch.tensor([train_y[i]])
            out = model(train_x[i], y[0])
            loss = F.cross_entropy(out.logits.float()[None], y)
            if out.instance_loss is not None:
                loss = cfg.bag_weight * loss + (1 - cfg.bag_weight) * out.instance_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        p = [torch.softmax(model(x).logits, 0)[1].item() for x in test_x]
    assert roc_auc_score(test_y, p) >= 0.95


def _survives(name: str, tiles: int, bf16: bool) -> None:
    """Inference on a random ``tiles`` x 1536 bag: finite logits, one float32 score per tile
    summing to 1 (a bf16 softmax over 100k tiles would drift)."""
    torch.manual_seed(0)
    x = torch.randn(tiles, 1536)
    model = build_model(ModelConfig(name=name), 1536, 2).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    assert out.logits.shape == (2,) and torch.isfinite(out.logits.float()).all()
    assert out.attention.dtype == torch.float32 and out.attention.shape == (tiles,)
    assert torch.isclose(out.attention.sum(), torch.tensor(1.0), atol=1e-4)


@pytest.mark.slow  # ~100 GFLOP per model: seconds each on 2 cores, TransMIL ~10x that
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_100k_tile_1536_d_bag(name: str) -> None:
    _survives(name, 100_000, bf16=False)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_10k_tile_1536_d_bag_under_bf16_autocast(name: str) -> None:
    """At 10k tiles: a CPU without native bf16 emulates it, several times slower than float32;
    the full 100k bag under bf16 autocast is run on a GPU by benchmarks/model_memory.py."""
    _survives(name, 10_000, bf16=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_training_step_keeps_attention_in_float32(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, hidden_dim=64, attention_dim=32), 32, 2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(300, 32), torch.tensor(1))
        loss = F.cross_entropy(out.logits.float()[None], torch.tensor([1]))
        if out.instance_loss is not None:
            loss = loss + out.instance_loss
    loss.backward()
    assert out.attention.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isclose(out.attention.sum(), torch.tensor(1.0), atol=1e-4)


def test_inference_in_chunks_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    x = torch.randn(CHUNK + 500, 24)
    for name in MODEL_NAMES:
        model = build_model(ModelConfig(name=name, hidden_dim=32, attention_dim=16), 24, 2).eval()
        with torch.no_grad():  # chunked embedding
            chunked = model(x)
        full = model(x)  # one pass, with a graph
        torch.testing.assert_close(chunked.logits, full.logits.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chunked.attention, full.attention.detach(), rtol=1e-4, atol=1e-9)


def test_clam_instance_loss_on_bags_smaller_than_k() -> None:
    for name in ("clam_sb", "clam_mb"):
        model = build_model(ModelConfig(name=name, k_sample=8), 32, 2).train()
        for n in (1, 2, 3, 9):
            out = model(torch.randn(n, 32), torch.tensor(1))
            assert out.instance_loss is not None and torch.isfinite(out.instance_loss)


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


def test_unknown_model_name_is_refused_before_any_bag_is_read(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.name='transmill' is not one of .*transmil"):
        load_config(FitConfig, [], ["model.name=transmill"])
    with pytest.raises(UserError, match="model.name"):
        build_model(ModelConfig(name="nope"), 16, 2)
    cfg = FitConfig(output_dir=str(tmp_path / "run"))  # built in code, as sweeps do
    cfg.model.name = "nope"
    cfg.data.features_dir = str(tmp_path / "missing")
    cfg.data.labels_csv = str(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="model.name"):  # not "labels.csv not found"
        run_fit(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_precisions_that_cast_the_model_are_refused_at_parse_time(precision: str) -> None:
    """`fit` feeds float32 bags: a model cast to another dtype would fail at its first step."""
    with pytest.raises(UserError, match=r"trainer.precision=.* not one of .*bf16-mixed"):
        load_config(FitConfig, [], [f"trainer.precision={precision}"])
    mixed = load_config(FitConfig, [], ["trainer.precision=bf16-mixed"])  # autocast: accepted
    assert mixed.trainer.precision == "bf16-mixed"


def test_landmarks_are_group_means_and_pinv_matches_linalg() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 10, 3)
    got = landmarks(t, 4)
    groups = [range(0, 3), range(3, 5), range(5, 8), range(8, 10)]  # i * 4 // 10
    want = torch.stack([t[:, list(g)].mean(1) for g in groups], 1)
    torch.testing.assert_close(got, want)
    kernel = torch.softmax(torch.randn(3, 6, 6), -1)
    torch.testing.assert_close(
        pinv(kernel, iterations=20), torch.linalg.pinv(kernel), atol=1e-3, rtol=1e-3
    )


def test_nystrom_attention_is_exact_when_each_landmark_group_is_one_repeated_token() -> None:
    """Tokens repeated l times make every landmark group constant, where Nystrom's
    softmax(Q K~) pinv(softmax(Q~ K~)) softmax(Q~ K) V equals softmax(Q K) V exactly."""
    torch.manual_seed(0)
    attn = NystromAttention(dim=32, n_landmarks=8).eval()
    x = torch.randn(8, 32).repeat_interleave(5, dim=0)  # 40 tokens, groups of 5 equal tokens
    with torch.no_grad():
        default, first = attn(x)  # 6 pseudo-inverse iterations, as the paper
        attn.pinv_iterations = 40  # a converged pseudo-inverse: the algebra must be exact
        approx, _ = attn(x)
        attn.m = 40  # one landmark per token: the exact path
        exact, first_exact = attn(x)
    torch.testing.assert_close(approx, exact, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(default, exact, atol=0.02, rtol=0.0)
    torch.testing.assert_close(first, first_exact)
    np.testing.assert_allclose(float(first.sum()), 1.0, atol=1e-5)


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


def test_a_dimension_constant_in_training_is_ignored_in_new_bags() -> None:
    """Its weights never trained: a new bag's value there must not move the prediction."""
    torch.manual_seed(0)
    train = [torch.randn(20, 8) for _ in range(4)]
    for bag in train:
        bag[:, 0] = 3.0
    model = build_model(ModelConfig(name="gated_attention", hidden_dim=16, attention_dim=8), 8, 2)
    feature_norm(model).fit_stats(train)
    model.eval()
    bag = torch.randn(10, 8)
    with torch.no_grad():
        bag[:, 0] = 3.0
        expected = model(bag).logits
        bag[0, 0] = 3.01
        assert torch.allclose(model(bag).logits, expected)
        assert torch.isfinite(feature_norm(model)(bag)).all()
    # weight averaging (Lightning's, with buffers) keeps the statistics finite
    averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    averaged.update_parameters(model)
    averaged.update_parameters(model)
    assert torch.isfinite(feature_norm(averaged.module).std).all()
