import math

import torch
from torch.testing import assert_close

from moekit.model import losses

PROBS = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
IDS = torch.tensor([[0], [0], [1], [0]])


def test_balance_loss_hand_computed():
    # f = [3/4, 1/4], P = [0.65, 0.35]: 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert_close(losses.load_balance_loss(PROBS, IDS), torch.tensor(1.15))


def test_balance_loss_excludes_padding():
    mask = torch.tensor([1, 1, 1, 0])
    # f = [2/3, 1/3], P = [1.7/3, 1.3/3]
    expected = 2 * (2 / 3 * 1.7 / 3 + 1 / 3 * 1.3 / 3)
    assert_close(losses.load_balance_loss(PROBS, IDS, mask), torch.tensor(expected))
    assert_close(losses.load_balance_loss(PROBS, IDS, mask), losses.load_balance_loss(PROBS[:3], IDS[:3]))


def test_balance_loss_is_one_when_uniform():
    T, E, K = 64, 8, 2
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)
    assert_close(losses.load_balance_loss(probs, ids), torch.tensor(1.0))
    assert ids.shape[1] == K


def test_balance_loss_uses_full_softmax_and_top_k_counts():
    # top-2 over 3 experts: counts over k; P over all experts (not only the chosen ones)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    ids = torch.tensor([[0, 1], [1, 2]])
    f = torch.tensor([1, 2, 1]) / 4
    P = torch.tensor([0.3, 0.45, 0.25])
    assert_close(losses.load_balance_loss(probs, ids), 3 * (f * P).sum())


def test_balance_loss_gradient_flows_through_probs():
    logits = torch.randn(16, 4, requires_grad=True)
    probs = logits.softmax(-1)
    ids = probs.topk(2, dim=-1).indices
    losses.load_balance_loss(probs, ids).backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_hand_computed_and_masked():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 100.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert_close(losses.z_loss(logits, torch.tensor([1, 1, 0])), torch.tensor(expected))
    assert losses.z_loss(logits) > 1000


def test_cv_squared_and_importance():
    assert_close(losses.cv_squared(torch.tensor([1.0, 1.0, 1.0])), torch.tensor(0.0))
    # values 1, 3: mean 2, population var 1 -> 0.25
    assert_close(losses.cv_squared(torch.tensor([1.0, 3.0])), torch.tensor(0.25))
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert_close(losses.importance_loss(gates), torch.tensor(0.0))
    assert_close(losses.importance_loss(gates, torch.tensor([1, 0, 0])), torch.tensor(1.0))


def test_entropy_and_max_violation():
    assert_close(losses.router_entropy(torch.full((5, 4), 0.25)), torch.tensor(math.log(4)))
    assert_close(losses.router_entropy(torch.tensor([[1.0, 0.0]])), torch.tensor(0.0))
    assert_close(losses.max_violation(torch.tensor([2, 2, 2, 2])), torch.tensor(0.0))
    assert_close(losses.max_violation(torch.tensor([5, 1, 1, 1])), torch.tensor(1.5))


def test_losses_with_all_padding_are_finite_zero():
    probs = torch.full((3, 4), 0.25)
    mask = torch.zeros(3)
    assert losses.load_balance_loss(probs, probs.topk(1).indices, mask) == 0
    assert losses.z_loss(torch.randn(3, 4), mask) == 0
