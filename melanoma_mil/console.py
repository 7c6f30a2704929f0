"""How the tool prints: log lines as bare messages, warnings as one line, libraries' chatter
quieted. Set up by the CLI and again in each of `tile`'s worker processes (which start with
Python's defaults)."""

from __future__ import annotations

import logging
import warnings


def one_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """A warning as one line, like errors: the file, line number and source line Python adds
    point into our code and mean nothing to a user. A library's deprecation keeps its category,
    so it does not read as our advice."""
    ours = category is UserWarning or category.__module__.startswith("melanoma_mil")
    return f"warning{'' if ours else f' ({category.__name__})'}: {message}\n"


def quiet_libraries() -> None:
    """Our INFO lines stay; Lightning's banner lines and known upstream deprecations go; other
    warnings print as one line (`one_line`)."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.formatwarning = one_line
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")
    # our metrics de-duplicate DistributedSampler's padded samples by bag index
    warnings.filterwarnings("ignore", message=r".*each sample/batch gets evaluated exactly once.*")


def configure_output(level: int = logging.INFO) -> None:
    """Log lines as bare messages at ``level`` and warnings as one line (`one_line`): in this
    process, and in each of `tile`'s worker processes, which start with Python's defaults (INFO
    lines dropped, warnings with file, line and source line) and so must be given the same."""
    logging.basicConfig(level=level, format="%(message)s")
    quiet_libraries()
