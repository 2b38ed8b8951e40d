import pytest
import torch

import dni_rnn as dni


def test_deferred_equals_one_backward_of_sum_and_runs_at_end():
    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64)
    h = x @ w
    expected = torch.autograd.grad(h.pow(2).sum() + (g * h).sum(), w)[0]

    h = x @ w
    with dni.defer_backward() as buffer:
        dni.backward(h.pow(2).sum())
        dni.backward(h, g)
        assert w.grad is None and len(buffer) == 2
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=1e-14)


def test_nested_blocks_join_the_outer_one():
    w = torch.ones(2, requires_grad=True)
    with dni.defer_backward() as outer:
        with dni.defer_backward() as inner:
            dni.backward((w * 3).sum())
        assert inner is outer and w.grad is None
        dni.backward((w * 2).sum())
    torch.testing.assert_close(w.grad, torch.full((2,), 5.0))


def test_exception_discards_collected_backwards():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(KeyError):
        with dni.defer_backward():
            dni.backward((w * 3).sum())
            raise KeyError("boom")
    assert w.grad is None
    assert not dni.deferred.is_deferring()
    with dni.defer_backward():  # the next block starts empty
        dni.backward(w.sum())
    torch.testing.assert_close(w.grad, torch.ones(2))


def test_outside_a_block_backward_is_immediate():
    w = torch.ones(2, requires_grad=True)
    dni.backward((w * 3).sum())
    torch.testing.assert_close(w.grad, torch.full((2,), 3.0))


def test_bad_backward_calls_are_clear_errors():
    w = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        dni.backward(w * 2, torch.ones(3, 2))
    with pytest.raises(ValueError, match="scalar"):
        dni.backward(w * 2)
    with pytest.raises(RuntimeError, match="does not require grad"):
        dni.backward(torch.ones(2).sum())
