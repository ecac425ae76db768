from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adtr.models.transformer import (
    ConcatProjection,
    ConvReconstructor,
    MultiHeadAttention,
    ReconstructionTransformer,
    attention,
    count_parameters,
    fourier_position_embedding,
    matching_conv_blocks,
    neighbourhood_mask,
    sincos_position_embedding,
)


def test_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4).eval()
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    out = attn(q, k, v)
    # Naive reference: per-head softmax(QK^T / sqrt(d)) V.
    Q = attn.q_proj(q).view(2, 5, 4, 4).transpose(1, 2)
    K = attn.k_proj(k).view(2, 7, 4, 4).transpose(1, 2)
    V = attn.v_proj(v).view(2, 7, 4, 4).transpose(1, 2)
    w = F.softmax(Q @ K.transpose(-1, -2) / 2.0, dim=-1)
    ref = attn.out_proj((w @ V).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_training_attention_matches_the_fused_kernel(masked):
    """The plain path that bf16 training takes on the CPU against SDPA's fused kernel on the
    same bf16 inputs: outputs and input gradients agree to bf16 precision."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16).bfloat16().requires_grad_() for _ in range(3))
    mask = neighbourhood_mask(8, 3) if masked else None
    dout = torch.randn(2, 4, 64, 16).bfloat16()
    results = []
    for fn in (attention, lambda q, k, v, m, p: F.scaled_dot_product_attention(q, k, v, attn_mask=m)):
        out = fn(q, k, v, mask, 0.0)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        results.append([t.float() for t in (out, *grads)])
    for ours, fused in zip(*results):
        assert (ours - fused).abs().max() <= 2e-2 * fused.abs().max()
    assert not torch.equal(results[0][0], results[1][0])  # two different kernels really ran


def test_shapes_and_gradients_reach_embeddings():
    torch.manual_seed(0)
    t = ReconstructionTransformer(dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64,
                                  dropout=0.0)
    tokens = torch.randn(3, 9, 32)
    pos = torch.randn(1, 9, 32, requires_grad=True)
    query = torch.randn(1, 9, 32, requires_grad=True)
    out = t(tokens, pos, query)
    assert out.shape == (3, 9, 32)
    out.sum().backward()
    assert pos.grad.abs().sum() > 0 and query.grad.abs().sum() > 0


def test_position_enters_every_attention_layer():
    """Changing pos changes each layer's output, not only the first layer's."""
    torch.manual_seed(0)
    t = ReconstructionTransformer(dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64,
                                  dropout=0.0).eval()
    x = torch.randn(1, 9, 32)
    pos_a, pos_b = torch.randn(1, 9, 32), torch.randn(1, 9, 32)
    # The last decoder layer alone, with identical inputs and memory, still depends on pos.
    layer = t.decoder[-1]
    tgt, mem = torch.randn(1, 9, 32), torch.randn(1, 9, 32)
    assert not torch.allclose(layer(tgt, mem, pos_a), layer(tgt, mem, pos_b))
    enc = t.encoder[-1]
    assert not torch.allclose(enc(x, pos_a), enc(x, pos_b))


def test_values_do_not_carry_position():
    """With uniform attention (zero q/k weights) pos cannot reach the output: it is not added to v."""
    layer = ReconstructionTransformer(dim=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=0, ffn_dim=16,
                                      dropout=0.0).encoder[0].eval()
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
    x = torch.randn(1, 5, 8)
    assert torch.allclose(layer(x, torch.randn(1, 5, 8)), layer(x, torch.randn(1, 5, 8)), atol=1e-6)


def tiny(**kw) -> ReconstructionTransformer:
    torch.manual_seed(0)
    return ReconstructionTransformer(dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64,
                                     dropout=0.0, **kw).eval()


def test_concat_projection_is_position_wise():
    torch.manual_seed(0)
    proj = ConcatProjection(16)
    q, v = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out = proj(q, torch.randn(2, 5, 16), v)
    assert out.shape == (2, 5, 16)
    assert torch.allclose(out, proj.proj(torch.cat([q, v], -1)))
    # Changing token 2 of the query or the value changes output token 2 only.
    q2, v2 = q.clone(), v.clone()
    q2[:, 2] += 1.0
    v2[:, 2] -= 1.0
    out2 = proj(q2, torch.randn(2, 5, 16), v2)
    others = [0, 1, 3, 4]
    assert torch.equal(out2[:, others], out[:, others])
    assert not torch.allclose(out2[:, 2], out[:, 2])
    with pytest.raises(ValueError, match="one to one"):
        proj(torch.randn(1, 5, 16), torch.randn(1, 7, 16), torch.randn(1, 7, 16))


def test_no_attention_transformer_mixes_no_tokens():
    t = tiny(attention=False)
    assert not any(isinstance(m, MultiHeadAttention) for m in t.modules())
    assert sum(isinstance(m, ConcatProjection) for m in t.modules()) == 3  # 1 encoder + 2 decoder
    tokens, pos, query = torch.randn(2, 9, 32), torch.randn(1, 9, 32), torch.randn(1, 9, 32)
    out = t(tokens, pos, query)
    changed = tokens.clone()
    changed[:, 4] += 3.0
    out2 = t(changed, pos, query)
    others = [i for i in range(9) if i != 4]
    assert torch.allclose(out2[:, others], out[:, others], atol=1e-6)
    assert not torch.allclose(out2[:, 4], out[:, 4])
    # The same probe shows that the real transformer does mix tokens.
    t = tiny()
    assert not torch.allclose(t(changed, pos, query)[:, others], t(tokens, pos, query)[:, others])


def test_without_query_the_decoder_reads_the_memory():
    t = tiny()
    tokens, pos, query = torch.randn(2, 9, 32, requires_grad=True), torch.randn(1, 9, 32), torch.randn(1, 9, 32)
    out = t(tokens, pos, None)
    assert out.shape == (2, 9, 32)
    assert not torch.allclose(out, t(tokens, pos, query))
    # The decoder starts from the memory: with no encoder layers, that is the tokens themselves.
    t.encoder = torch.nn.ModuleList()
    ref = t.decoder[0](tokens, tokens, pos)
    assert torch.allclose(t(tokens, pos, None), ref)
    ref.sum().backward()
    assert tokens.grad.abs().sum() > 0


def test_conv_reconstructor_shape_and_skip():
    torch.manual_seed(0)
    cnn = ConvReconstructor(32, 2)
    x = torch.randn(2, 32, 4, 4)
    assert cnn(x).shape == (2, 32, 4, 4)
    assert len(cnn.blocks) == 2
    assert cnn.blocks[0].norm1.num_groups == 32 and ConvReconstructor(48, 1).blocks[0].norm1.num_groups == 24
    # With the residual branch silenced, each block is relu(x + 0): only the skip remains.
    for block in cnn.blocks:
        torch.nn.init.zeros_(block.norm2.weight)
        torch.nn.init.zeros_(block.norm2.bias)
    assert torch.equal(cnn(x), F.relu(x))
    with pytest.raises(ValueError, match="at least 1"):
        ConvReconstructor(32, 0)


def test_matching_conv_blocks_has_similar_size():
    n = matching_conv_blocks(256, 1024, 4, 4)
    with torch.device("meta"):
        transformer = count_parameters(ReconstructionTransformer(256, 8, 4, 4, 1024))
        cnn = count_parameters(ConvReconstructor(256, n))
        fewer, more = (count_parameters(ConvReconstructor(256, k)) for k in (n - 1, n + 1))
    assert n == 6
    assert abs(cnn - transformer) <= 0.3 * transformer
    assert abs(cnn - transformer) <= min(abs(fewer - transformer), abs(more - transformer))
    assert matching_conv_blocks(32, 64, 1, 1) >= 1


def test_neighbourhood_mask_hides_the_square_around_each_token():
    m = neighbourhood_mask(5, 3)  # (25, 25)
    assert m.shape == (25, 25) and not m.diagonal().any()
    assert m[12].view(5, 5).logical_not().nonzero().tolist() == [[r, c] for r in (1, 2, 3) for c in (1, 2, 3)]
    assert m[0].view(5, 5).logical_not().sum() == 4  # a corner token hides a 2x2 square
    for bad in (2, 0, 5):
        with pytest.raises(ValueError):
            neighbourhood_mask(5, bad)


def test_masked_decoder_never_reads_a_tokens_own_neighbourhood():
    """One decoder layer, no encoder: output i may depend only on tokens outside i's 3x3 square."""
    torch.manual_seed(0)
    t = ReconstructionTransformer(32, 4, 0, 1, 64, 0.0).eval()
    mask = neighbourhood_mask(4, 3)
    tokens, pos, query = torch.randn(1, 16, 32), torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    for i in (0, 5, 15):
        changed = tokens.clone()
        changed[:, i] += 3.0
        moved = (t(changed, pos, query, mask) - t(tokens, pos, query, mask)).abs().amax(-1)[0] > 1e-5
        assert moved.tolist() == mask[:, i].tolist()  # exactly the tokens that may attend to i


def test_sincos_position_embedding_codes_row_and_column():
    e = sincos_position_embedding(4, 16)[0]  # (16 tokens, 16 channels)
    assert e.shape == (16, 16)
    assert torch.allclose(e[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    # Tokens in the same row share the row half, in the same column the column half.
    assert torch.equal(e[5, :8], e[6, :8]) and not torch.equal(e[5, 8:], e[6, 8:])
    assert torch.equal(e[1, 8:], e[13, 8:]) and not torch.equal(e[1, :8], e[13, :8])
    assert len({tuple(row.tolist()) for row in e}) == 16  # every position distinct
    with pytest.raises(ValueError):
        sincos_position_embedding(4, 10)


def test_fourier_position_codes_are_alike_for_neighbours_and_nearly_orthogonal_far_apart():
    """The expected cosine of two cells' codes is exp(-d^2 / 2) at distance d (length scale 1
    cell); 1024 channels keep the sampling error near 0.03."""
    g = torch.Generator().manual_seed(0)
    e = fourier_position_embedding(16, 1024, generator=g)[0]  # (256 cells, 1024 channels)
    assert e.shape == (256, 1024) and abs(float(e.var()) - 1) < 0.05
    unit = F.normalize(e, dim=-1)

    def cos(a, b):
        return float(unit[a[0] * 16 + a[1]] @ unit[b[0] * 16 + b[1]])

    assert cos((5, 5), (5, 6)) == pytest.approx(0.607, abs=0.1)  # exp(-1/2)
    assert cos((5, 5), (6, 6)) == pytest.approx(0.368, abs=0.1)  # exp(-1)
    assert abs(cos((2, 2), (12, 13))) < 0.1
    sim = unit @ unit.T
    assert abs(float(sim[~torch.eye(256, dtype=torch.bool)].mean())) < 0.05  # uniform codes: 0.75
    wide = F.normalize(fourier_position_embedding(16, 1024, length_scale=3.0, generator=g)[0], dim=-1)
    assert float(wide[5 * 16 + 5] @ wide[5 * 16 + 7]) > cos((5, 5), (5, 7))  # a longer scale, more alike
