"""Lightning DataModule over bags already in RAM: no disk reads after the first load."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from melanoma_mil.data.bags import BagStore


class BagDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Yields (bag [N, D], label, index); index lets metrics dedupe DDP-padded samples."""

    def __init__(
        self,
        store: BagStore,
        bag_ids: list[str],
        labels: list[int],
        max_instances: int | None = None,
    ) -> None:
        self.bags = [store.bags[b] for b in bag_ids]
        self.labels = labels
        self.max_instances = max_instances

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        bag = self.bags[i]
        if self.max_instances and bag.shape[0] > self.max_instances:
            bag = bag[torch.randperm(bag.shape[0])[: self.max_instances]]
        return bag, self.labels[i], i


def _single(
    batch: list[tuple[torch.Tensor, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags differ in size, so a batch is one bag: [1, N, D] plus label and index."""
    bag, label, index = batch[0]
    return bag.unsqueeze(0), torch.tensor([label]), torch.tensor([index])


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
    ) -> None:
        super().__init__()
        self.store, self.labels = store, labels
        self.ids = {"train": train, "val": val, "test": test}
        self.max_instances, self.balance, self.num_workers = max_instances, balance, num_workers

    def dataset(self, part: str) -> BagDataset:
        ids = self.ids[part]
        cap = self.max_instances if part == "train" else None
        return BagDataset(self.store, ids, [self.labels[b] for b in ids], cap)

    def class_counts(self, n_classes: int) -> torch.Tensor:
        labels = torch.tensor([self.labels[b] for b in self.ids["train"]])
        return torch.bincount(labels, minlength=n_classes).float()

    def _loader(self, part: str, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(
            self.dataset(part),
            batch_size=1,
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=_single,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.balance == "sampler":
            counts = self.class_counts(int(max(self.labels.values())) + 1)
            weights = [1.0 / counts[self.labels[b]].item() for b in self.ids["train"]]
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
            return self._loader("train", sampler=sampler)
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
