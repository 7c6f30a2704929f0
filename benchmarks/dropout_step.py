"""CPU training step of gated-attention MIL: torch's nn.Dropout vs ours (`models.common.Dropout`).

Same random bags, model init, optimizer and order for both (train_throughput.py's bare loop);
the two alternate for --rounds rounds so a drift in machine speed hits both alike. Prints the
best epoch of each and the ratio.

    python benchmarks/dropout_step.py [--bags 40 --min-n 2000 --max-n 10000 --dim 1024]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from train_throughput import plain_epochs, seeded_model

from melanoma_mil.models.common import Dropout


def with_dropout(model: nn.Module, kind: type[nn.Dropout]) -> nn.Module:
    """``model`` with each of its dropout layers replaced by ``kind`` of the same rate."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout):
                setattr(module, name, kind(child.p))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bags", type=int, default=40)
    ap.add_argument("--min-n", type=int, default=2000)
    ap.add_argument("--max-n", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(a.min_n, a.max_n + 1, (a.bags,), generator=g).tolist()
    bags = [torch.randn(n, a.dim, generator=g) for n in sizes]
    labels = [i % 2 for i in range(a.bags)]
    times: dict[str, list[float]] = {"nn.Dropout": [], "ours": []}
    for _ in range(a.rounds):
        for name, kind in (("nn.Dropout", nn.Dropout), ("ours", Dropout)):
            model = with_dropout(seeded_model(a.dim), kind)
            times[name] += plain_epochs(lambda i: bags[i], labels, model, 1)
    tiles = sum(sizes)
    print(f"{a.bags} bags, {tiles} tiles x {a.dim}, {torch.get_num_threads()} threads, CPU")
    for name, ts in times.items():
        per = ", ".join(f"{t:.2f}" for t in ts)
        rate = tiles / min(ts)
        print(f"{name:<11} best {min(ts):6.2f} s/epoch ({rate:7.0f} tiles/s; rounds {per})")
    print(f"ours / nn.Dropout = {min(times['ours']) / min(times['nn.Dropout']):.3f}")


if __name__ == "__main__":
    main()
