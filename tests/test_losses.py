from __future__ import annotations

import math

import pytest
import torch

from adtr.losses import image_push_pull_loss, log1mexp, pixel_push_pull_loss, pseudo_huber_map, topk_score


def test_pseudo_huber_matches_eq6_and_is_exact_near_zero():
    f, r = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    a = (f - r).abs().mean(1)
    assert torch.allclose(pseudo_huber_map(f, r), torch.sqrt(a**2 + 1) - 1, atol=1e-6)
    tiny = pseudo_huber_map(torch.full((1, 1, 1, 1), 1e-4), torch.zeros(1, 1, 1, 1))
    assert tiny.item() == pytest.approx(0.5e-8, rel=1e-4)  # a^2 / 2 for small a; naive form gives 0


@pytest.mark.parametrize("x", [1e-8, 1e-3, 0.5, math.log(2.0), 3.0, 50.0])
def test_log1mexp_is_accurate(x):
    expected = math.log(-math.expm1(-max(x, 1e-6)))
    assert log1mexp(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-9)


def test_all_normal_batch_and_zero_phi_give_finite_values_and_gradients():
    phi = torch.zeros(3, 4, 4, requires_grad=True)
    for loss in (pixel_push_pull_loss(phi, torch.zeros(3, 4, 4)), pixel_push_pull_loss(phi, torch.ones(3, 4, 4)),
                 image_push_pull_loss(phi, torch.tensor([0, 1, 1]))):
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(phi.grad).all()
        phi.grad = None


def test_pixel_loss_matches_eq7():
    phi = torch.rand(2, 3, 3) + 0.1
    y = torch.zeros(2, 3, 3)
    y[0, 1, 1] = 1
    alpha = 0.003
    expected0 = ((1 - y[0]) * phi[0]).mean() - alpha * torch.log(1 - torch.exp(-(y[0] * phi[0]).mean()))
    expected1 = phi[1].mean()  # no anomalous cell: pull term only
    assert pixel_push_pull_loss(phi, y, alpha).item() == pytest.approx(((expected0 + expected1) / 2).item(), rel=1e-6)


def test_gradients_pull_normal_and_push_anomalous():
    phi = torch.full((1, 2, 2), 0.5, requires_grad=True)
    y = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    pixel_push_pull_loss(phi, y).backward()
    assert phi.grad[0, 0, 0] < 0 < phi.grad[0, 1, 1]  # descent raises anomalous phi, lowers normal phi


def test_topk_and_image_loss():
    phi = torch.arange(16.0).view(1, 4, 4) / 10
    assert topk_score(phi, k=4).item() == pytest.approx((1.5 + 1.4 + 1.3 + 1.2) / 4)
    q = topk_score(phi, k=4)
    assert image_push_pull_loss(phi, torch.tensor([0]), k=4).item() == pytest.approx(q.item())
    expected = -0.003 * math.log(1 - math.exp(-q.item()))
    assert image_push_pull_loss(phi, torch.tensor([1]), k=4).item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_values_for_all_normal_and_all_anomalous_batches():
    phi = torch.full((2, 2, 2), 0.5)
    # All normal: the pull term alone, mean phi = 0.5.
    assert pixel_push_pull_loss(phi, torch.zeros(2, 2, 2)).item() == pytest.approx(0.5)
    # All anomalous: no pull; push = -0.003 * ln(1 - e^-0.5) = -0.003 * ln(0.393469) = 0.0027982.
    assert pixel_push_pull_loss(phi, torch.ones(2, 2, 2)).item() == pytest.approx(0.0027982, rel=1e-4)
    # Image level, k = 2 of 4 cells at 0.5: q = 0.5, the same two values.
    assert image_push_pull_loss(phi, torch.zeros(2), k=2).item() == pytest.approx(0.5)
    assert image_push_pull_loss(phi, torch.ones(2), k=2).item() == pytest.approx(0.0027982, rel=1e-4)
    # phi = 0 on an anomalous cell: the clamp keeps the push term finite (-0.003 * ln(1e-6) = 0.041447).
    assert pixel_push_pull_loss(torch.zeros(1, 1, 1), torch.ones(1, 1, 1)).item() == pytest.approx(0.041447, rel=1e-3)
