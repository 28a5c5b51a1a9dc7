"""ELRLoss: the regulariser and the EMA targets against a direct transcription of the method."""

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast.elr import ELRLoss


def _by_hand(logits, target, index, ema, lam, beta, ignore_index=-100):
    """Liu et al.'s ELR with CCE, written out (clamp 1e-4, EMA of the renormalised clamped softmax)."""
    valid = target != ignore_index
    p = torch.softmax(logits, 1).clamp(1e-4, 1 - 1e-4)
    ema = ema.clone()
    upd = (p.detach() / p.detach().sum(1, keepdim=True))[valid]
    ema[index[valid]] = beta * ema[index[valid]] + (1 - beta) * upd
    reg = torch.log(1 - (ema[index] * p).sum(1))[valid].mean()
    return F.cross_entropy(logits, target, ignore_index=ignore_index) + lam * reg, ema


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_the_method_over_steps(backend):
    n_examples, c = 30, 5
    elr = ELRLoss(n_examples, c, lam=3.0, beta=0.7, backend=backend).double()
    ema = torch.zeros(n_examples, c, dtype=torch.float64)
    for _ in range(3):
        logits = torch.randn(8, c, dtype=torch.float64, requires_grad=True)
        target = torch.randint(0, c, (8,))
        target[1] = -100
        index = torch.randperm(n_examples)[:8]
        want, ema = _by_hand(logits, target, index, ema, 3.0, 0.7)
        (g_want,) = torch.autograd.grad(want, logits)
        got = elr(logits, target, index)
        (g_got,) = torch.autograd.grad(got, logits)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(elr.ema, ema, rtol=0, atol=0)


def test_ignored_rows_are_not_updated():
    elr = ELRLoss(4, 3)
    logits, target, index = torch.randn(2, 3), torch.tensor([0, -100]), torch.tensor([0, 1])
    elr(logits, target, index)
    assert elr.ema[0].sum() > 0 and torch.equal(elr.ema[1], torch.zeros(3))


def test_state_follows_the_module():
    elr = ELRLoss(5, 3, scheme=rf.DM())
    elr(torch.randn(4, 3), torch.randint(0, 3, (4,)), torch.arange(4))
    state = elr.state_dict()
    assert "ema" in state and state["ema"].shape == (5, 3)
    fresh = ELRLoss(5, 3, scheme=rf.DM())
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ema, elr.ema)
    assert elr.to(torch.float64).ema.dtype == torch.float64


def test_errors():
    elr = ELRLoss(5, 3)
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(IndexError, match="index value 7"):
        elr(x, y, torch.tensor([0, 7]))
    with pytest.raises(IndexError, match="index value -1"):
        elr(x, y, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer"):
        elr(x, y, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="index must have shape"):
        elr(x, y, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        elr(torch.randn(2, 4), y, torch.tensor([0, 1]))
    for kwargs in ({"beta": 1.0}, {"lam": -1.0}, {"num_examples": 0}):
        args = {"num_examples": 5, "num_classes": 3, **kwargs}
        with pytest.raises(ValueError):
            ELRLoss(**args)
