"""Batching: the (N, B) layout, masks, rank splits (chunks are the runner's walk)."""

import pytest
import torch

from corpora import CorpusError, batchify, batchify_mask, split_streams


def test_batchify_layout_matches_the_drawing():
    data = batchify(torch.arange(26), 4)  # a..z as 0..25; y, z dropped
    assert data.shape == (6, 4) and data.is_contiguous()
    assert data.tolist() == [[0, 6, 12, 18], [1, 7, 13, 19], [2, 8, 14, 20],
                             [3, 9, 15, 21], [4, 10, 16, 22], [5, 11, 17, 23]]


def test_document_mask_follows_its_ids():
    ids = torch.arange(12)
    starts = torch.zeros(12, dtype=torch.bool)
    starts[[0, 4, 5, 10]] = True
    data, mask = batchify(ids, 3), batchify_mask(starts, 3)
    assert mask.dtype == torch.bool and mask.shape == (4, 3)
    assert data[mask].sort().values.tolist() == [0, 4, 5, 10]
    assert mask.tolist() == [[True, True, False], [False, True, False],
                             [False, False, True], [False, False, False]]
    with pytest.raises(CorpusError, match="must be bool"):
        batchify_mask(starts.long(), 3)


def test_split_streams_across_ranks():
    data = batchify(torch.arange(24), 4)  # (6, 4)
    r0, r1 = split_streams(data, 0, 2), split_streams(data, 1, 2)
    assert r0.tolist() == data[:, :2].tolist() and r1.tolist() == data[:, 2:].tolist()
    assert torch.equal(torch.cat([split_streams(data, r, 4) for r in range(4)], dim=1), data)
    feats = torch.zeros(5, 6, 3)  # synthetic (L, B, D) streams split the same way
    assert split_streams(feats, 2, 3).shape == (5, 2, 3)
    with pytest.raises(CorpusError, match="global batch 4 does not split across 3 ranks"):
        split_streams(data, 0, 3)
    with pytest.raises(CorpusError, match="rank 2 is not in a world of size 2"):
        split_streams(data, 2, 2)


def test_batchify_errors_and_device():
    with pytest.raises(CorpusError, match="too short"):
        batchify(torch.arange(3), 4)
    with pytest.raises(CorpusError, match="1-D"):
        batchify(torch.zeros(2, 2), 1)
    assert batchify(torch.arange(8), 2, device="cpu").device.type == "cpu"
