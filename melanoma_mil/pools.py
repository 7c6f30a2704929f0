"""Where worker processes come from: one forkserver per process, preloaded once."""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

_PRELOAD: set[str] = set()


def worker_context(*modules: str) -> BaseContext:
    """The start method of every process pool here, with ``modules`` (the workers' own) added
    to what the forkserver imports when the first pool of this process starts.

    Spawn started each worker as a fresh interpreter that imported numpy, scipy, h5py and
    OpenSlide again: seconds per worker, per pool. A forkserver imports them once and forks
    each worker from that clean process. Not plain fork: the caller may hold torch/OpenMP
    threads (demo, notebooks) that a fork would copy broken. The server keeps the environment
    of its start: a later change of ``os.environ`` does not reach the workers. Where there is
    no forkserver (Windows), spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    _PRELOAD.update(modules)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(sorted(_PRELOAD))  # no effect once the server runs
    return ctx
