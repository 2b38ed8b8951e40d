"""train.threads = 0: runs on one machine share the cores (dni_rnn/cores.py)."""
import subprocess
import sys

import torch

from dni_rnn.cores import CoreShare


def test_runs_split_the_cores_and_gone_runs_give_them_back(tmp_path):
    me = CoreShare(tmp_path, cores=4)
    assert me.live_runs() == 1 and me.threads() == 4
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / str(other.pid)).write_text("")     # a second run registers
        assert me.live_runs() == 2 and me.threads() == 2
        (tmp_path / "notes.txt").write_text("")         # not a run
        assert me.live_runs() == 2
    finally:
        other.kill()
        other.wait()
    assert me.threads() == 4                            # it ended: its share comes back
    assert not (tmp_path / str(other.pid)).exists()     # and its file is cleaned up
    me.close()
    assert list(tmp_path.iterdir()) == [tmp_path / "notes.txt"]


def test_apply_sets_torch_threads_and_never_below_one(tmp_path):
    before = torch.get_num_threads()
    try:
        share = CoreShare(tmp_path, cores=1)
        for pid in (1,):                                # init: always alive
            (tmp_path / str(pid)).write_text("")
        assert share.apply() == 1 and torch.get_num_threads() == 1
        share.close()
    finally:
        torch.set_num_threads(before)


def test_an_unwritable_registry_behaves_as_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    share = CoreShare(blocker / "running", cores=3)
    assert share.threads() == 3
    share.close()
