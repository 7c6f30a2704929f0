"""Lightning DataModule over a memory-mapped bag store: no copies until a bag is used.

A batch is ``(bags, labels, indices)``: a list of [N, D] bags (one per training step, up to
``EVAL_BAGS`` per validation/test step), class indices and dataset indices (which let metrics
drop the bags DistributedSampler repeats in evaluation). Training bags come in `EpochOrder`,
the same for one process and for N ranks. On a GPU each bag goes from the map through pinned
memory, copied on a side stream while the previous step computes; when the whole store fits in
GPU memory it is copied there once per process and bags become slices of it, with no
host-to-device traffic per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    WeightedRandomSampler,
    get_worker_info,
)

from melanoma_mil.data.memory import EVAL_BAGS
from melanoma_mil.data.store import BagStore

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int, int]
Batch = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]
GPU_STORE_SHARE = 0.5  # the store goes on the GPU when it takes at most this share of free memory


class BagDataset(Dataset[Item]):
    """Yields (bag [N, D], label, index): a view of the store, or a random subsample.

    Training samplers ask for ``epoch * len(dataset) + index``: the subsample of a bag is then
    drawn from (seed, epoch, index) alone, the same in one process, on N ranks or in a loader
    worker, and new every epoch."""

    def __init__(
        self,
        store: BagStore,
        bag_ids: list[str],
        labels: list[int],
        max_instances: int | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.spans = [store.spans[b] for b in bag_ids]
        self.labels = labels
        self.max_instances = max_instances
        self.seed = seed

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, key: int) -> Item:
        epoch, i = divmod(key, len(self.spans))
        start, n = self.spans[i]
        bag = self.store.features[start : start + n]
        if self.max_instances and n > self.max_instances:
            mix = np.random.SeedSequence([self.seed % 2**63, epoch, i]).generate_state(1, np.uint64)
            g = torch.Generator().manual_seed(int(mix[0]) & (2**63 - 1))
            # in the bag's own order: transmil lays tiles out on its grid in sequence, as it
            # sees every bag at test time
            bag = bag[torch.randperm(n, generator=g)[: self.max_instances].sort().values]
        return bag, self.labels[i], i


def collate(items: list[Item]) -> Batch:
    """Bags differ in size, so they stay a list. In a worker process a view of the map is
    copied: sending the view would move the whole mapped file into shared memory."""
    bags = [b for b, _, _ in items]
    if get_worker_info() is not None:
        bags = [b.clone() if b.untyped_storage().nbytes() > b.nbytes else b for b in bags]
    labels = torch.tensor([y for _, y, _ in items])
    return bags, labels, torch.tensor([i for _, _, i in items])


class EpochOrder(DistributedSampler):
    """The training order: one permutation of the bags per epoch, drawn from (seed, epoch) only,
    cut to a whole number of optimizer steps and dealt round-robin to the ranks (as
    ``epoch * len(dataset) + index``, see `BagDataset`).

    Step k of an epoch then trains on the same bags whether one process accumulates
    ``bags_per_step`` of them or that many ranks take one each (DistributedSampler would pad
    with repeated bags, and a single process would draw another order). With one bag per step
    and one process, every bag is used every epoch, as before.
    """

    def __init__(self, dataset: Dataset[Item], seed: int, bags_per_step: int) -> None:
        ranks = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if ranks else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        n = len(dataset)  # type: ignore[arg-type]
        self.used = n - n % bags_per_step if n >= bags_per_step else n - n % world

    def __iter__(self):  # type: ignore[no-untyped-def]
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g)[: self.used]
        return iter((order[self.rank :: self.num_replicas] + self.epoch * n).tolist())

    def __len__(self) -> int:
        return self.used // self.num_replicas


class EpochWeighted(WeightedRandomSampler):
    """Class-balanced draws (data.balance=sampler) from (seed, epoch) only, told to `BagDataset`
    with the epoch. Under DDP Lightning deals one list of draws out to the ranks (its
    DistributedSamplerWrapper forwards `set_epoch`), so every rank must draw the same list: the
    global generator would not do, as `training_step` reseeds it per rank. That wrapper
    reshuffles the list before dealing it, so N ranks see the bags one process accumulating N
    per step sees, in another order (unlike `EpochOrder`)."""

    epoch = 0

    def __init__(self, weights: list[float], seed: int) -> None:
        super().__init__(weights, num_samples=len(weights), replacement=True)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it on samplers that have it
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        n = len(self.weights)
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return (self.epoch * n + i for i in super().__iter__())


class BagDataModule(L.LightningDataModule):
    def __init__(
        self,
        store: BagStore,
        labels: dict[str, int],
        train: list[str],
        val: list[str],
        test: list[str],
        max_instances: int | None = None,
        balance: str = "loss",
        num_workers: int = 0,
        seed: int = 0,
        bags_per_step: int = 1,
    ) -> None:
        super().__init__()
        self.store, self.labels = store, labels
        self.seed, self.bags_per_step = seed, bags_per_step
        self.ids = {"train": train, "val": val, "test": test}
        self.max_instances, self.balance, self.num_workers = max_instances, balance, num_workers
        self._placement: dict[str, bool] = {}  # device -> whole store there
        self._copiers: dict[str, Copier] = {}

    def dataset(self, part: str) -> BagDataset:
        ids = self.ids[part]
        cap = self.max_instances if part == "train" else None
        return BagDataset(self.store, ids, [self.labels[b] for b in ids], cap, self.seed)

    def class_counts(self, n_classes: int) -> torch.Tensor:
        labels = torch.tensor([self.labels[b] for b in self.ids["train"]])
        return torch.bincount(labels, minlength=n_classes).float()

    def _loader(self, part: str, batch_size: int = 1, shuffle: bool = False, sampler=None):
        return DataLoader(
            self.dataset(part),
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.num_workers > 0 and self._device().type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.balance == "sampler":
            counts = self.class_counts(int(max(self.labels.values())) + 1)
            weights = [1.0 / counts[self.labels[b]].item() for b in self.ids["train"]]
            sampler = EpochWeighted(weights, self.seed)
            return self._loader("train", sampler=sampler)
        order = EpochOrder(self.dataset("train"), self.seed, self.bags_per_step)
        return self._loader("train", sampler=order)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", EVAL_BAGS)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", EVAL_BAGS)

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _resident(self, device: torch.device) -> torch.Tensor | None:
        """The store on ``device`` when it fits comfortably and bags are plain slices of it
        (decided once per device; the copy is shared by every fold of the process)."""
        key = str(device)
        if key not in self._placement:
            fits = False
            if device.type == "cuda" and self.num_workers == 0:
                free, _ = torch.cuda.mem_get_info(device)
                fits = key in self.store.device_features or (
                    self.store.nbytes() <= GPU_STORE_SHARE * free
                )
            self._placement[key] = fits
            if fits and key not in self.store.device_features:
                log.info("bag store copied to %s (%.1f GB)", device, self.store.nbytes() / 1e9)
        return self.store.on_device(device) if self._placement[key] else None

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int):
        """Views of the store become slices of its GPU copy; other bags are copied from pinned
        memory on a side stream, overlapping the step the GPU is still running."""
        if device.type == "cpu":
            return batch
        bags, labels, index = batch
        if device.type != "cuda":
            return [b.to(device) for b in bags], labels.to(device), index.to(device)
        if str(device) not in self._copiers:
            self._copiers[str(device)] = Copier(device)
        copier = self._copiers[str(device)]
        moved = move_bags(bags, self.store, self._resident(device), copier)
        labels, index = copier([labels, index])
        return moved, labels, index


class Copier:
    """Host -> GPU copies from pinned memory on a side stream; the compute stream waits for
    them only where it uses them, so a copy overlaps the kernels queued before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        main.wait_stream(self.stream)
        for t in out:
            t.record_stream(main)  # its memory is not reused before the step has run
        return out


def move_bags(
    bags: list[torch.Tensor],
    store: BagStore,
    resident: torch.Tensor | None,
    copy: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> list[torch.Tensor]:
    """Each bag on the device: a slice of ``resident`` (the store's copy there) when the bag
    is a view of the store's map, else ``copy``'d (subsampled bags, worker copies)."""
    base = store.features.untyped_storage().data_ptr()
    moved = []
    for bag in bags:
        if resident is not None and bag.untyped_storage().data_ptr() == base:
            start = bag.storage_offset() // store.dim
            moved.append(resident[start : start + bag.shape[0]])
        else:
            moved.append(copy([bag])[0])
    return moved
