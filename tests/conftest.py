import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def shared_data_root():
    """Where the Penn Treebank files live for tests: $DNI_RNN_DATA_DIR or ../shared/data."""
    root = os.environ.get("DNI_RNN_DATA_DIR")
    return Path(root) if root else REPO.parent / "shared" / "data"


@pytest.fixture
def ptb_dir():
    d = shared_data_root() / "ptb"
    if not (d / "ptb.train.txt").exists():
        pytest.skip(f"Penn Treebank files not found in {d}; set DNI_RNN_DATA_DIR")
    return d


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Every cache (ours and Hugging Face's) goes to a temporary directory, never the network."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DNI_RNN_CACHE_DIR", str(cache / "dni_rnn"))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
