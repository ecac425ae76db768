from __future__ import annotations

import pytest
import torch

from adtr.errors import AdtrError
from adtr.models.adtr import ADTR, RECONSTRUCTORS, reconstruction_loss
from adtr.models.transformer import ConcatProjection, ConvReconstructor, MultiHeadAttention


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


@pytest.mark.parametrize("name", RECONSTRUCTORS)
def test_every_reconstructor_runs_and_trains(name):
    m = small(reconstructor=name)
    assert m.reconstructor == name
    f = torch.randn(2, 12, 4, 4)
    out = m(f)
    assert out.features.shape == out.reconstruction.shape == (2, 12, 4, 4)
    assert out.anomaly_map.shape == (2, 1, 4, 4)
    reconstruction_loss(out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_default_state_dict_keys_are_unchanged():
    keys = set(small().state_dict())
    assert {"pos_embed", "query_embed", "feature_mean", "feature_std", "input_proj.weight",
            "output_proj.weight", "transformer.encoder.0.self_attn.q_proj.weight",
            "transformer.decoder.0.cross_attn.out_proj.weight"} <= keys
    assert all(k.split(".")[0] in {"pos_embed", "query_embed", "feature_mean", "feature_std", "input_proj",
                                   "output_proj", "transformer"} for k in keys)


def test_variant_modules_and_keys():
    no_attn = small(reconstructor="no-attention")
    assert not any(isinstance(x, MultiHeadAttention) for x in no_attn.modules())
    assert any(isinstance(x, ConcatProjection) for x in no_attn.modules())
    assert "query_embed" in no_attn.state_dict()
    no_query = small(reconstructor="no-query")
    assert "query_embed" not in no_query.state_dict() and "pos_embed" in no_query.state_dict()
    cnn = small(reconstructor="cnn")
    keys = set(cnn.state_dict())
    assert isinstance(cnn.cnn, ConvReconstructor)
    assert not keys & {"pos_embed", "query_embed"} and not any(k.startswith("transformer.") for k in keys)
    # A transformer checkpoint cannot be loaded into an ablation by mistake.
    with pytest.raises(RuntimeError):
        cnn.load_state_dict(small().state_dict())


def test_no_attention_model_is_local():
    """Without attention (and 1x1 projections) a cell's reconstruction depends on that cell alone."""
    m = small(reconstructor="no-attention").eval()
    f = torch.randn(1, 12, 4, 4)
    g = f.clone()
    g[:, :, 1, 2] += 5.0
    changed = (m(f).reconstruction - m(g).reconstruction).abs().sum(1)[0] > 1e-5
    assert changed.nonzero().tolist() == [[1, 2]]
    m = small().eval()
    assert ((m(f).reconstruction - m(g).reconstruction).abs().sum(1)[0] > 1e-5).sum() > 1


def test_unknown_reconstructor():
    with pytest.raises(ValueError, match="reconstructor must be one of"):
        small(reconstructor="rnn")


@pytest.mark.parametrize("name", RECONSTRUCTORS)
def test_state_dict_round_trip(name):
    a = small(reconstructor=name).eval()
    a.set_feature_stats(torch.randn(8, 12, 4, 4) * 3 + 1)
    torch.manual_seed(1)
    b = ADTR(12, 4, dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, dropout=0.0,
             reconstructor=name).eval()
    f = torch.randn(2, 12, 4, 4)
    assert not torch.allclose(a(f).reconstruction, b(f).reconstruction)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(f).reconstruction, b(f).reconstruction)


def test_feature_jitter_only_in_training():
    f = torch.randn(2, 12, 4, 4)
    m = small(jitter=20.0)
    m.train()
    assert not torch.allclose(m(f).reconstruction, m(f).reconstruction)  # fresh noise each call
    m.eval()
    assert torch.equal(m(f).reconstruction, m(f).reconstruction)
    plain = small().train()
    assert torch.equal(plain(f).reconstruction, plain(f).reconstruction)  # jitter 0: no noise


def test_neighbour_mask_model_keeps_checkpoint_keys():
    masked, plain = small(neighbour_mask=3), small()
    assert masked.state_dict().keys() == plain.state_dict().keys()
    masked.load_state_dict(plain.state_dict())
    f = torch.randn(1, 12, 4, 4)
    assert not torch.allclose(masked.eval()(f).reconstruction, plain.eval()(f).reconstruction)
    with pytest.raises(ValueError, match="needs attention"):
        small(reconstructor="cnn", neighbour_mask=3)


def test_build_model_rejects_bad_mask_and_jitter():
    from adtr.config import ModelConfig
    from adtr.engine import build_model

    for bad in ({"neighbour_mask": 4}, {"neighbour_mask": 17}, {"jitter": -1.0},
                {"neighbour_mask": 3, "reconstructor": "no-attention"}, {"pos_init": "fixed"},
                {"cross_init": "tied"}):
        with pytest.raises(AdtrError):
            build_model(ModelConfig(**bad), 12)


def test_sincos_position_init_is_learned():
    from adtr.models.transformer import sincos_position_embedding

    m = small(pos_init="sincos")
    assert torch.equal(m.pos_embed.detach(), sincos_position_embedding(4, 16)) and m.pos_embed.requires_grad
    with pytest.raises(ValueError):
        small(pos_init="fixed")


def test_fourier_position_init_is_learned_and_follows_the_seed():
    a, b = small(pos_init="fourier"), small(pos_init="fourier")  # small() seeds torch
    assert torch.equal(a.pos_embed, b.pos_embed) and a.pos_embed.requires_grad
    assert not torch.equal(a.pos_embed, small(pos_init="normal").pos_embed)
    assert a.pos_embed.shape == (1, 16, 16) and float(a.pos_embed.detach().abs().max()) <= 2**0.5 + 1e-6


def offdiagonal_cosine(codes: torch.Tensor) -> float:
    """Mean cosine similarity between the (L, D) codes of different positions."""
    unit = torch.nn.functional.normalize(codes, dim=-1)
    sim = unit @ unit.T
    return float(sim[~torch.eye(len(codes), dtype=torch.bool)].mean())


def test_normal_position_codes_start_nearly_orthogonal_uniform_ones_alike():
    """At the default sizes (256 positions x 256 channels): why ``pos_init='normal'``."""
    torch.manual_seed(0)
    uniform, normal = ADTR(12, 16, pos_init="uniform"), ADTR(12, 16, pos_init="normal")
    assert offdiagonal_cosine(uniform.pos_embed[0].detach()) > 0.7
    assert abs(offdiagonal_cosine(normal.pos_embed[0].detach())) < 0.02
    assert normal.pos_embed.requires_grad and abs(float(normal.pos_embed.detach().std()) - 1) < 0.02


def own_cell_share(model: ADTR) -> float:
    """Share of (head, query position) pairs whose largest position-only cross-attention logit
    in the first decoder layer is at the query's own position."""
    attn = model.transformer.decoder[0].cross_attn
    pos = model.pos_embed.detach()[0]  # (L, D)
    nh = attn.num_heads
    q = attn.q_proj(pos).view(len(pos), nh, -1).transpose(0, 1)  # (nh, L, hs)
    k = attn.k_proj(pos).view(len(pos), nh, -1).transpose(0, 1)
    best = (q @ k.transpose(1, 2)).argmax(-1)  # (nh, L)
    return float((best == torch.arange(len(pos))).float().mean())


@torch.no_grad()
def test_aligned_cross_attention_starts_reading_each_tokens_own_cell():
    torch.manual_seed(0)
    aligned = ADTR(12, 16, pos_init="normal", cross_init="aligned")
    attn = aligned.transformer.decoder[-1].cross_attn
    assert torch.equal(attn.k_proj.weight, attn.q_proj.weight) and torch.equal(attn.k_proj.bias, attn.q_proj.bias)
    assert attn.k_proj.weight is not attn.q_proj.weight  # equal at the start, trained independently
    assert own_cell_share(aligned) > 0.95
    torch.manual_seed(0)
    assert own_cell_share(ADTR(12, 16, pos_init="normal", cross_init="independent")) < 0.05  # chance: 1/256
    torch.manual_seed(0)  # uniform codes are too alike for a copied projection to tell positions apart
    assert own_cell_share(ADTR(12, 16, pos_init="uniform", cross_init="aligned")) < 0.5
    small(cross_init="aligned", reconstructor="no-attention")  # nothing to align: built as it is


@torch.no_grad()
def test_aligned_last_aligns_only_the_last_decoder_layer():
    torch.manual_seed(0)
    model = ADTR(12, 16, pos_init="normal", cross_init="aligned-last")
    *earlier, last = [layer.cross_attn for layer in model.transformer.decoder]
    assert torch.equal(last.k_proj.weight, last.q_proj.weight) and torch.equal(last.k_proj.bias, last.q_proj.bias)
    assert earlier and not any(torch.equal(a.k_proj.weight, a.q_proj.weight) for a in earlier)
    assert own_cell_share(model) < 0.05  # the first layer is as DETR starts it


def test_cells_per_token_embeds_blocks_of_cells():
    """P x P cells share one token: 4x4 cells -> 2x2 tokens, the map stays on the 4x4 cell grid."""
    m = small(cells_per_token=2).eval()
    assert m.pos_embed.shape == (1, 4, 16) and m.query_embed.shape == (1, 4, 16)
    assert m.input_proj.weight.shape == (16, 12, 2, 2) and m.output_proj.weight.shape == (12 * 4, 16, 1, 1)
    f = torch.randn(2, 12, 4, 4)
    out = m(f)
    assert out.reconstruction.shape == f.shape and out.anomaly_map.shape == (2, 1, 4, 4)
    expected = (f - out.reconstruction).pow(2).sum(1, keepdim=True).sqrt()
    assert torch.allclose(out.anomaly_map, expected, atol=1e-5)
    # Without attention, a change in one cell reaches exactly the cells of its own token's block.
    local = small(cells_per_token=2, reconstructor="no-attention").eval()
    g = f.clone()
    g[:, :, 1, 2] += 5.0
    changed = (local(f).reconstruction - local(g).reconstruction).abs().sum(1)[0] > 1e-5
    assert changed.nonzero().tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    reconstruction_loss(small(cells_per_token=2)(f)).backward()  # trains end to end


def test_cells_per_token_one_is_the_paper_model():
    a, b = small(), small(cells_per_token=1)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    f = torch.randn(2, 12, 4, 4)
    assert torch.equal(a.eval()(f).reconstruction, b.eval()(f).reconstruction)


def test_cells_per_token_must_divide_the_grid():
    from adtr.config import ModelConfig
    from adtr.engine import build_model

    for bad in (0, 3):
        with pytest.raises(ValueError, match="cells_per_token"):
            small(cells_per_token=bad)
    with pytest.raises(AdtrError, match="cells_per_token"):
        build_model(ModelConfig(grid_stride=16, cells_per_token=3), 12)
    assert build_model(ModelConfig(grid_stride=8, cells_per_token=2), 12).pos_embed.shape[1] == 256
