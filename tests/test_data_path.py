"""The training data path: same numbers as before the store, fewer copies, no host syncs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from melanoma_mil.config import FitConfig, ModelConfig, OptimConfig, load_config
from melanoma_mil.data.cohort import build_cohort
from melanoma_mil.data.datamodule import (
    BagDataModule,
    BagDataset,
    EpochOrder,
    EpochWeighted,
    collate,
    move_bags,
)
from melanoma_mil.data.memory import EVAL_BAGS
from melanoma_mil.data.store import BagStore, open_store
from melanoma_mil.data.synthetic import make_bag_cohort
from melanoma_mil.models import build_model, feature_norm
from melanoma_mil.models.clam import ClamSB, clam_instance_loss
from melanoma_mil.models.common import head_dims
from melanoma_mil.training.cv import run_fit
from melanoma_mil.training.module import MILModule


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_bag_cohort(tmp_path_factory.mktemp("bags"), n_patients=24, dim=16, shift=4.0)


def store_of(features: Path, labels: Path, *extra: str) -> tuple[BagStore, dict[str, int]]:
    cfg = load_config(
        FitConfig, [], [f"data.features_dir={features}", f"data.labels_csv={labels}", *extra]
    )
    cohort = build_cohort(cfg.data)
    labels_of = dict(zip(cohort.bags["bag_id"], cohort.bags["label"].astype(int), strict=True))
    return open_store(cohort.members, cfg), labels_of


def test_float16_store_trains_exactly_like_float32(cohort, tmp_path: Path) -> None:
    """float16 features -> float16 store: the numbers a step sees equal a float32 copy's."""
    features, labels = cohort
    preds = []
    for dtype in ("auto", "float32"):
        out = tmp_path / dtype
        cfg = load_config(
            FitConfig,
            [],
            [
                f"data.features_dir={features}",
                f"data.labels_csv={labels}",
                f"output_dir={out}",
                f"data.dtype={dtype}",
                "data.max_instances=30",
                "trainer.accelerator=cpu",
                "trainer.max_epochs=2",
                "cv.folds=2",
                "logger=none",
            ],
        )
        assert run_fit(cfg) == 0
        preds.append(pd.read_csv(out / "predictions.csv"))
    pd.testing.assert_frame_equal(*preds, check_exact=True)


def test_eval_batches_equal_one_bag_at_a_time(cohort) -> None:
    store, labels = store_of(*cohort)
    ids = list(store.bags)
    assert len(ids) > EVAL_BAGS  # several steps, the last one short
    torch.manual_seed(0)
    module = MILModule.create(store.dim, 2, ModelConfig(), OptimConfig(), None, 1)
    dm = BagDataModule(store, labels, ids, ids, ids)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=dm, verbose=False)
    assert module.test_output is not None
    index, y, probs = module.test_output
    module.model.eval()
    with torch.no_grad():
        for i, p in zip(index, probs, strict=True):
            bag = store.bags[ids[i]].float()
            assert torch.equal(torch.softmax(module.model(bag).logits, -1), torch.from_numpy(p))
            assert y[i] == labels[ids[i]]


def test_subsamples_depend_on_seed_epoch_and_bag_only(cohort) -> None:
    """data.max_instances: rank r of 2 at step k gets the very subsample one process gets for
    the same bag (and a loader worker, which holds a copy of the dataset); a new epoch draws a
    new one."""
    store, labels = store_of(*cohort)
    ids = list(store.bags)
    data = BagDataset(store, ids, [labels[b] for b in ids], max_instances=5, seed=7)
    assert all(store.spans[b][1] > 5 for b in ids)

    def drawn(order: EpochOrder | EpochWeighted, epoch: int) -> list[tuple[int, torch.Tensor]]:
        order.set_epoch(epoch)
        return [(i, bag) for bag, _, i in (data[k] for k in order)]

    one = drawn(EpochOrder(data, seed=7, bags_per_step=2), 3)
    for i, bag in one:  # a subset in the bag's order (transmil's grid is laid out in sequence)
        start, n = store.spans[ids[i]]
        rows = [int(torch.nonzero((store.features[start : start + n] == t).all(1))[0]) for t in bag]
        assert rows == sorted(rows) and len(set(rows)) == 5, rows
    ranks = []
    for r in (0, 1):
        order = EpochOrder(data, seed=7, bags_per_step=2)
        order.num_replicas, order.rank = 2, r
        ranks.append(drawn(order, 3))
    dealt = [x for pair in zip(*ranks, strict=True) for x in pair]  # step k: rank 0, rank 1
    assert len(dealt) == len(one)
    for (i, bag), (j, other) in zip(one, dealt, strict=True):
        assert i == j and torch.equal(bag, other)
    again = dict(drawn(EpochOrder(data, seed=7, bags_per_step=2), 4))
    assert sum(not torch.equal(bag, again[i]) for i, bag in one) > len(one) // 2
    # class-balanced draws (data.balance=sampler) also see the epoch, and are the same on every
    # rank whatever the global generator's state (Lightning deals one list out to the ranks)
    draws = []
    for state in (1, 2, 2):
        weighted = EpochWeighted([1.0] * len(ids), seed=7)
        weighted.set_epoch(2 + (len(draws) == 2))
        torch.manual_seed(state)
        draws.append(list(weighted))
    assert all(2 * len(ids) <= k < 3 * len(ids) for k in draws[0])
    assert draws[0] == draws[1] and [k - len(ids) for k in draws[0]] != draws[2]


def test_device_copy_is_sliced_not_copied(cohort) -> None:
    store, labels = store_of(*cohort)
    ids = list(store.bags)
    resident = store.features.clone()  # stands in for the store's copy on a GPU
    data = BagDataset(store, ids, [labels[b] for b in ids], max_instances=10)
    bags, _, _ = collate([data[0], data[1]])
    moved = move_bags(bags, store, resident, lambda ts: [t.clone() for t in ts])
    for bag, m in zip(bags, moved, strict=True):
        assert torch.equal(bag, m)
    subsampled = bags[0].shape[0] == 10
    assert (moved[0].untyped_storage().data_ptr() == resident.untyped_storage().data_ptr()) != (
        subsampled
    )
    whole = move_bags([store.bags[ids[2]]], store, resident, lambda ts: [t.clone() for t in ts])[0]
    assert whole.untyped_storage().data_ptr() == resident.untyped_storage().data_ptr()


def test_workers_send_the_bag_not_the_whole_map(cohort) -> None:
    store, labels = store_of(*cohort)
    ids = list(store.bags)[:10]
    dm = BagDataModule(store, labels, ids, ids, ids, num_workers=1)
    for bags, _, index in dm.test_dataloader():
        for bag, i in zip(bags, index, strict=True):
            assert torch.equal(bag, store.bags[ids[int(i)]])
            assert bag.untyped_storage().nbytes() == bag.nbytes  # only this bag travelled
    module = MILModule.create(store.dim, 2, ModelConfig(), OptimConfig(), None, 1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=dm, verbose=False)  # the loaders as `fit` builds them
    assert module.test_output is not None and len(module.test_output[0]) == len(ids)


def test_feature_norm_is_skipped_only_while_it_is_the_identity() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 12, 2)
    norm = feature_norm(model)
    x = torch.randn(50, 12) * 3 + 1
    assert norm.identity and norm(x) is x
    inv = 1.0 / norm.std
    assert torch.equal(torch.addcmul(-norm.mean * inv, x, inv), x)  # the skipped pass: a no-op
    norm.fit_stats([x])
    assert not norm.identity and not torch.equal(norm(x), x)
    loaded = build_model(ModelConfig(), 12, 2)
    loaded.load_state_dict(model.state_dict())
    assert not feature_norm(loaded).identity and torch.equal(feature_norm(loaded)(x), norm(x))
    fresh = build_model(ModelConfig(), 12, 2)
    fresh.load_state_dict(build_model(ModelConfig(), 12, 2).state_dict())
    assert feature_norm(fresh).identity


def reference_instance_loss(model: ClamSB, h: torch.Tensor, a: torch.Tensor, label: int):
    """CLAM's instance loss as it branched on the label on the host (the code it replaces)."""
    k = min(8, h.shape[0] // 2)
    losses = []
    for c, clf in enumerate(model.instance_classifiers):
        top = h[torch.topk(a, k).indices]
        if c == label:
            bottom = h[torch.topk(-a, k).indices]
            inst = torch.cat([top, bottom])
            target = torch.cat([h.new_ones(k), h.new_zeros(k)]).long()
        else:
            inst, target = top, h.new_zeros(k).long()
        losses.append(F.cross_entropy(clf(inst).float(), target))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(("n_classes", "label"), [(2, 0), (2, 1), (3, 2)])
def test_clam_sb_without_host_sync_equals_the_branching_version(n_classes, label) -> None:
    results = []
    for fn in ("device", "reference"):
        torch.manual_seed(0)
        model = ClamSB(16, n_classes, head_dims(ModelConfig(name="clam_sb", dropout=0.0), 16))
        x = torch.randn(40, 16)
        h, a, m = model.pool(x)
        if fn == "device":
            loss = clam_instance_loss(
                h, a.detach()[:, None], torch.tensor(label), model.instance_classifiers, 8
            )
        else:
            loss = reference_instance_loss(model, h, a.detach(), label)
        (loss + model.classifier(m).sum()).backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(g, r) for g, r in zip(grads_a, grads_b, strict=True))
