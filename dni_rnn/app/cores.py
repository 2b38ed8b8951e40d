"""`train.threads = 0`: runs on one machine share its cores instead of each taking all.

torch's default gives every process one thread per core, so two runs side by side each
run as many threads as there are cores and crawl (measured on 2 cores: 60% system time,
until each was given one thread). A run that leaves the thread count to us registers
itself in `CACHE/running/` (one file per process, named by its pid) and uses
`cores // live runs` threads, recomputed at each log line: a run started alone takes all
cores and gives half back when a second one starts. Files of processes that are gone are
removed by whoever looks next.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from corpora.paths import cache_root


def machine_cores():
    """Cores this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class CoreShare:
    """This process's share of the machine's cores among registered runs.

    Args:
        folder: the registry (default: the cache's `running/`).
        cores: the cores to share (default: `machine_cores()`).
    """

    def __init__(self, folder=None, cores=None):
        self.folder = Path(folder) if folder is not None else cache_root() / "running"
        self.cores = cores or machine_cores()
        self.file = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = self.folder / str(os.getpid())
            self.file.write_text("")
        except OSError:  # an unwritable cache: behave as if alone
            self.file = None

    def live_runs(self):
        """Registered processes still alive (at least this one)."""
        if self.file is None:
            return 1
        n = 0
        for f in self.folder.iterdir():
            if not f.name.isdigit():
                continue
            if _alive(int(f.name)):
                n += 1
            else:
                f.unlink(missing_ok=True)
        return max(n, 1)

    def threads(self):
        return max(1, self.cores // self.live_runs())

    def apply(self):
        """Set torch's thread count to this run's share; returns it."""
        n = self.threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n

    def close(self):
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            self.file = None
