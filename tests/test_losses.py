"""Explicit boundary, BG-SPP loss and focal weights on hand-computed tensors."""

import math

import pytest
import torch

from bgad_core.models.bgad.boundary import Boundary, find_boundary
from bgad_core.errors import ConfigError
from bgad_core.models.bgad.losses import abnormal_focal_weights, bg_spp_loss, ml_loss, normal_focal_weights


def test_boundary_is_beta_quantile_of_normals():
    # 20 normal values -10..9 (per-dim logps), abnormal ones must be ignored.
    normal = torch.arange(-10.0, 10.0)
    logps = torch.cat([normal, torch.tensor([50.0, -50.0])])
    labels = torch.cat([torch.zeros(20), torch.ones(2)]).long()
    b = find_boundary(logps, labels, beta=0.1, tau=0.1, normalizer=10.0)
    # int(20 * 0.1) = 2 -> third smallest normal value = -8, divided by the normalizer.
    assert float(b.normal) == pytest.approx(-0.8)
    assert float(b.abnormal) == pytest.approx(-0.9)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_beta_outside_unit_interval_is_rejected(beta):
    with pytest.raises(ConfigError, match="beta"):
        find_boundary(torch.zeros(4), torch.zeros(4).long(), beta=beta, tau=0.1, normalizer=10.0)


def test_bg_spp_loss_hand_computed():
    boundary = Boundary(normal=torch.tensor(-1.0), abnormal=torch.tensor(-1.5))
    # normalised values: normals -2.0 (violates by 1.0), -1.2 (by 0.2), 0.0 (fine);
    # abnormals -1.0 (violates by 0.5), -3.0 (fine).
    logps = torch.tensor([-20.0, -12.0, 0.0, -10.0, -30.0])
    labels = torch.tensor([0, 0, 0, 1, 1])
    loss = bg_spp_loss(logps, labels, boundary, normalizer=10.0)
    assert float(loss) == pytest.approx((1.0 + 0.2) / 2 + 0.5 / 1)


def test_bg_spp_loss_weighted_and_no_violators():
    boundary = Boundary(normal=torch.tensor(-1.0), abnormal=torch.tensor(-1.5))
    logps = torch.tensor([-20.0, 0.0, -10.0])
    labels = torch.tensor([0, 0, 1])
    weights = torch.tensor([2.0, 7.0, 3.0])
    assert float(bg_spp_loss(logps, labels, boundary, 10.0, weights)) == pytest.approx(2.0 * 1.0 + 3.0 * 0.5)
    fine = bg_spp_loss(torch.tensor([0.0, -40.0]), torch.tensor([0, 1]), boundary, 10.0)
    assert float(fine) == 0.0


def test_bg_spp_gradient_pulls_normals_up_and_pushes_abnormals_down():
    boundary = Boundary(normal=torch.tensor(-1.0), abnormal=torch.tensor(-1.5))
    logps = torch.tensor([-20.0, -10.0], requires_grad=True)
    bg_spp_loss(logps, torch.tensor([0, 1]), boundary, 10.0).backward()
    assert logps.grad[0] < 0 < logps.grad[1]  # descent raises the normal, lowers the abnormal


def test_ml_loss_is_negative_log_sigmoid():
    logps = torch.tensor([-3.0, 1.0])
    expected = (math.log1p(math.exp(3.0)) + math.log1p(math.exp(-1.0))) / 2
    assert float(ml_loss(logps)) == pytest.approx(expected)


def test_focal_weights_follow_eq_17_to_19():
    # normal: easy (scaled > -0.2) -> 1; hard -> 11.7 * (1 - e^s)^0.5 * |s|
    w = normal_focal_weights(torch.tensor([-1.0, -5.0]), normalizer=10.0)
    assert float(w[0]) == 1.0
    assert float(w[1]) == pytest.approx(11.7 * (1 - math.exp(-0.5)) ** 0.5 * 0.5)
    # abnormal: easy (scaled <= -1) -> 1; hard -> 0.53 * (1 + e^s)^2 / |s|
    w = abnormal_focal_weights(torch.tensor([-20.0, -5.0]), normalizer=10.0)
    assert float(w[0]) == 1.0
    assert float(w[1]) == pytest.approx(0.53 * (1 + math.exp(-0.5)) ** 2 / 0.5)
