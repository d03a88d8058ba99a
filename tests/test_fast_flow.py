"""The position-table evaluation of the flow is FrEIA's flow: same log-likelihood, same gradients."""

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import pytest
import torch

from bgad_core.models.bgad.fast_flow import (check_supported, condition_tables, distinct_positions, grid_log_likelihood,
                                 positioned_log_likelihood)
from bgad_core.models.bgad.flow import build_flow, log_likelihood
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.positional import positional_encoding_2d
from bgad_core.engine.selection import seed_everything


def trained_like_flow(channels: int, cond_dim: int, blocks: int = 4, scale: float = 0.2) -> Ff.SequenceINN:
    """A flow moved away from its identity-like initialisation, so agreement is not trivial."""
    seed_everything(0)  # numpy too: FrEIA draws its soft permutations with numpy
    flow = build_flow(channels, cond_dim, coupling_blocks=blocks)
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("channels", [7, 24])
def test_matches_freia_output_log_det_and_gradients(channels):
    flow = trained_like_flow(channels, cond_dim=16)
    table = positional_encoding_2d(16, 6, 5).flatten(1).T.contiguous()
    cells = torch.randint(30, (300,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(300, channels)

    z, log_det = flow(x, c=[table[cells]])
    reference = log_likelihood(z, log_det)
    reference.sum().backward()
    reference_grads = [p.grad.clone() for p in flow.parameters() if p.requires_grad]
    flow.zero_grad()

    conditions, index = distinct_positions(cells, table)
    fast = positioned_log_likelihood(flow, x, conditions, index)
    fast.sum().backward()
    fast_grads = [p.grad for p in flow.parameters() if p.requires_grad]

    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-4)
    for ours, theirs in zip(fast_grads, reference_grads):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bf16_matmuls_stay_within_stated_tolerance():
    """bf16 subnet matmuls: per-dim log-likelihoods within 1 % (relative, floor 1) and 0.1 nats of float32.

    The paper's 8-block flow at realistic likelihoods (median about -1.8 per dim). Over 20 random flows like this
    one the worst of 2,000 vectors was 0.049 nats off (0.8 % relative); the typical error is ~0.001.
    """
    channels = 40
    flow = trained_like_flow(channels, cond_dim=128, blocks=8, scale=0.1)
    table = positional_encoding_2d(128, 16, 16).flatten(1).T.contiguous()
    cells = torch.randint(256, (2000,), generator=torch.Generator().manual_seed(2))
    x = torch.randn(2000, channels)
    conditions, index = distinct_positions(cells, table)
    with torch.no_grad():
        full = positioned_log_likelihood(flow, x, conditions, index) / channels
        half = positioned_log_likelihood(flow, x, conditions, index, precision="bf16") / channels
    assert half.dtype == torch.float32
    error = (half - full).abs()
    assert float(error.max()) < 0.1
    assert float((error / full.abs().clamp_min(1)).max()) < 0.01
    assert float(torch.corrcoef(torch.stack([half, full]))[0, 1]) > 0.999


def test_model_maps_equal_freia_maps():
    model = BGADFlows([8, 12], cond_dim=8, coupling_blocks=2)
    features = [torch.randn(3, 8, 6, 5), torch.randn(3, 12, 3, 2)]
    for level, (feature, logps) in enumerate(zip(features, model(features))):
        batch, channels, height, width = feature.shape
        vectors = feature.permute(0, 2, 3, 1).reshape(-1, channels)
        conditions = model.positions(height, width, feature.device).repeat(batch, 1)
        z, log_det = model.flows[level](vectors, c=[conditions])
        expected = (log_likelihood(z, log_det) / channels).reshape(batch, height, width)
        assert torch.allclose(logps, expected, atol=1e-5)


def test_unsupported_flow_is_refused():
    flow = Ff.SequenceINN(6)
    flow.append(Fm.AllInOneBlock, subnet_constructor=lambda i, o: torch.nn.Linear(i, o), permute_soft=True)
    with pytest.raises(TypeError, match="AllInOneBlock flow of build_flow"):
        check_supported(flow)


def test_position_blocks_match_freia_output_and_gradients():
    """A training block (images x a few cells, condition broadcast over images) is FrEIA's model exactly."""
    flow = trained_like_flow(24, cond_dim=16)
    table = positional_encoding_2d(16, 6, 5).flatten(1).T.contiguous()
    cells = torch.tensor([4, 17, 0, 29, 11])
    x = torch.randn(7 * len(cells), 24)  # image-major: 7 images, each at the 5 cells

    z, log_det = flow(x, c=[table[cells.repeat(7)]])
    reference = log_likelihood(z, log_det)
    reference.sum().backward()
    reference_grads = [p.grad.clone() for p in flow.parameters() if p.requires_grad]
    flow.zero_grad()

    blocked = grid_log_likelihood(flow, x, condition_tables(flow, table[cells]))
    blocked.sum().backward()
    assert torch.allclose(blocked, reference, rtol=1e-5, atol=1e-4)
    for ours, theirs in zip((p.grad for p in flow.parameters() if p.requires_grad), reference_grads):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
