from __future__ import annotations

import pytest
import torch

from adtr.errors import AdtrError
from adtr.models.adtr import ADTR, reconstruction_loss


def small(**kw) -> ADTR:
    torch.manual_seed(0)
    return ADTR(12, 4, dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, dropout=0.0, **kw)


def test_output_shapes_and_map_definition():
    m = small().eval()
    f = torch.randn(2, 12, 4, 4)
    out = m(f)
    assert out.reconstruction.shape == f.shape
    assert out.anomaly_map.shape == (2, 1, 4, 4)
    expected = (f - out.reconstruction).pow(2).sum(1, keepdim=True).sqrt()  # Eq. 2-3
    assert torch.allclose(out.anomaly_map, expected, atol=1e-5)
    assert torch.allclose(reconstruction_loss(out), expected.pow(2).mean(), rtol=1e-5)  # Eq. 1


def test_grid_mismatch_is_a_clear_error():
    with pytest.raises(AdtrError, match="grid 8x8 does not match the model's 4x4"):
        small()(torch.randn(1, 12, 8, 8))


def test_feature_stats_and_standardized_error():
    m = small()
    f = torch.randn(50, 12, 4, 4) * torch.arange(1, 13).view(1, 12, 1, 1) + 3.0
    m.set_feature_stats(f)
    assert torch.allclose(m.feature_mean.flatten(), f.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(m.feature_std.flatten(), f.std(dim=(0, 2, 3), unbiased=False), rtol=1e-3)
    ms = small(error_space="standardized")
    ms.load_state_dict(m.state_dict())
    m.eval()
    ms.eval()
    a, b = m(f[:2]), ms(f[:2])
    assert torch.allclose(a.reconstruction, b.reconstruction)
    std_map = ((f[:2] - a.reconstruction) / m.feature_std).pow(2).sum(1, keepdim=True).sqrt()
    assert torch.allclose(b.anomaly_map, std_map, atol=1e-4)


def test_learns_to_reconstruct_constant_data():
    """Fitting constant features drives the error (and so every score) near zero."""
    m = small()
    f = torch.full((8, 12, 4, 4), 2.0) + torch.linspace(0, 1, 12).view(1, 12, 1, 1)
    m.set_feature_stats(f + 0.01 * torch.randn_like(f))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    start = reconstruction_loss(m(f)).item()
    for _ in range(150):
        loss = reconstruction_loss(m(f))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * start
