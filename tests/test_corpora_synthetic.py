"""Copy and Repeat Copy: exact layouts, determinism, streams, the curriculum."""

import pytest
import torch

from corpora import (Curriculum, CorpusError, bit_errors, copy_task, episode_length,
                     offset_streams, repeat_copy_task)


def test_copy_layout():
    b = copy_task(batch_size=3, seq_len=4, n_episodes=2, bits=8, seed=0)
    L = 2 * episode_length(4)
    assert episode_length(4) == 10
    assert b.inputs.shape == (L, 3, 9) and b.targets.shape == (L, 3, 9)
    assert b.mask.shape == b.resets.shape == (L, 3) and b.mask.dtype == torch.bool
    x = b.inputs[:4, :, :8]
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert b.inputs[4, :, 8].tolist() == [1.0] * 3 and b.inputs[:4, :, 8].sum() == 0
    assert b.inputs[5:10].sum() == 0                       # silent while answering
    assert torch.equal(b.targets[5:9, :, :8], x)             # the copy
    assert b.targets[9, :, 8].tolist() == [1.0] * 3 and b.targets[:9, :, 8].sum() == 0
    assert b.mask[:, 0].tolist() == [False] * 5 + [True] * 5 + [False] * 5 + [True] * 5
    assert b.resets[:, 0].nonzero().flatten().tolist() == [0, 10]
    assert not torch.equal(b.inputs[:4], b.inputs[10:14])   # a new episode, new bits


def test_repeat_copy_layout():
    b = repeat_copy_task(batch_size=2, seq_len=3, repeats=2, bits=4, max_repeats=8, seed=1)
    assert episode_length(3, 2) == 12 and b.inputs.shape == (12, 2, 6) and b.targets.shape == (12, 2, 5)
    x = b.inputs[:3, :, :4]
    assert b.inputs[3, :, 4].tolist() == [1.0, 1.0]
    assert b.inputs[4, :, 5].tolist() == [0.25, 0.25]      # R / max_repeats
    assert torch.equal(b.targets[5:8, :, :4], x) and torch.equal(b.targets[8:11, :, :4], x)
    assert b.targets[11, :, 4].tolist() == [1.0, 1.0] and b.targets[:11, :, 4].sum() == 0
    assert b.mask[:, 1].tolist() == [False] * 5 + [True] * 7


def test_determinism_and_generator_streams():
    a, b = copy_task(4, 5, 3, seed=7), copy_task(4, 5, 3, seed=7)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a.inputs, copy_task(4, 5, 3, seed=8).inputs)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = [repeat_copy_task(2, 2, 3, generator=g1).inputs for _ in range(2)]
    second = [repeat_copy_task(2, 2, 3, generator=g2).inputs for _ in range(2)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])              # the generator moves on


def test_offset_streams_delay_each_stream_by_blank_steps():
    L_ep = episode_length(3)
    b = copy_task(batch_size=64, seq_len=3, n_episodes=3, bits=4, seed=0)
    o = offset_streams(b, L_ep, torch.Generator().manual_seed(5))
    assert all(t.shape == u.shape and t.dtype == u.dtype for t, u in zip(o, b))
    offsets = []
    for s in range(64):
        r = int(o.resets[1:, s].nonzero()[0]) + 1 if not o.resets[1:, s].all() else 0
        r = 0 if torch.equal(o.inputs[:, s], b.inputs[:, s]) else r
        offsets.append(r)
        assert 0 <= r < L_ep and o.resets[0, s]
        assert o.inputs[:r, s].sum() == 0 and not o.mask[:r, s].any()   # blank, no loss
        for t_new, t_old in zip(o, b):                                  # then the episodes
            assert torch.equal(t_new[r:, s], t_old[:len(t_old) - r, s])
    assert len(set(offsets)) > L_ep // 2                                # phases spread
    again = offset_streams(b, L_ep, torch.Generator().manual_seed(5))
    assert all(torch.equal(t, u) for t, u in zip(o, again))
    r = repeat_copy_task(4, 2, 2, 2, bits=4, seed=1)
    assert offset_streams(r, episode_length(2, 2)).mask.shape == r.mask.shape
    with pytest.raises(CorpusError, match="max_offset"):
        offset_streams(b, 0)


def test_bit_errors():
    b = copy_task(2, 3, seed=0)
    perfect = b.targets * 20 - 10                           # logits with the right signs
    assert bit_errors(perfect, b.targets, b.mask).item() == 0
    wrong = perfect.clone()
    wrong[4, 0, :3] *= -1                                   # three bits wrong on a counted step
    wrong[0, 1, :] *= -1                                    # not counted (reading phase)
    assert bit_errors(wrong, b.targets, b.mask).item() == 3
    assert bit_errors(torch.sigmoid(wrong), b.targets, b.mask, logits=False).item() == 3


def test_curriculum_steps_and_state():
    c = Curriculum(start=1, step=1, threshold=0.15, max_len=3)
    assert c.update(0.2) is False and c.value == 1
    assert c.update(0.1) is True and c.value == 2
    assert c.update(0.15) is False                          # not below the threshold
    assert c.update(0.0) is True and c.length == 3 and c.at_max
    assert c.update(0.0) is False and c.value == 3
    p = Curriculum(start=2, step=2, patience=2)
    assert [p.update(e) for e in (0.1, 0.5, 0.1, 0.1)] == [False, False, False, True] and p.value == 4
    p.update(0.0)
    sd = p.state_dict()
    assert sd == {"start": 2, "step": 2, "threshold": 0.15, "max_len": None, "patience": 2,
                  "value": 4, "solved_in_a_row": 1, "steps_taken": 1}
    q = Curriculum()
    q.load_state_dict(sd)
    assert q.update(0.0) is True and q.value == 6


def test_bad_arguments():
    with pytest.raises(CorpusError, match="seq_len must be positive"):
        copy_task(2, 0)
    with pytest.raises(CorpusError, match="repeats"):
        repeat_copy_task(2, 2, 0)
    with pytest.raises(CorpusError, match="below start"):
        Curriculum(start=5, max_len=3)
