from __future__ import annotations

import copy

import pytest
import torch

from adtr import checkpoint as ckpt_io
from adtr.config import ModelConfig, with_overrides
from adtr.data import index_mvtec
from adtr.engine import build_model, fit
from adtr.optim import Muon, MuonAdamW, make_optimizer, orthogonalize

from conftest import tiny_config


def test_fused_adamw_takes_the_steps_of_the_reference_loop():
    torch.manual_seed(0)
    fused_net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    loop_net = copy.deepcopy(fused_net)
    fused = make_optimizer(fused_net, 1e-2, 1e-4, torch.device("cpu"))
    loop = torch.optim.AdamW(loop_net.parameters(), lr=1e-2, weight_decay=1e-4, foreach=False)
    assert fused.defaults["fused"]
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((fused_net, fused), (loop_net, loop)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128)])
def test_orthogonalize_flattens_the_spectrum(shape):
    """Singular values spread over 2 decades come out in Muon's band around 1, directions kept."""
    torch.manual_seed(0)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n)))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n)))
    s = torch.logspace(0, -2, min(m, n))
    g = u @ torch.diag(s) @ v.T
    out = orthogonalize(g)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.25
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 50  # the input was far from it
    # the same singular directions: U^T out V is close to diagonal
    core = u.T @ out @ v
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 0.05


def test_orthogonalize_batches_like_one_matrix_at_a_time():
    g = torch.randn(5, 32, 96)
    batched = orthogonalize(g)
    single = torch.stack([orthogonalize(x) for x in g])
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("shape", [(256, 256), (256, 1024), (1024, 256)])
def test_orthogonalize_in_bf16_matches_fp32(shape):
    """The fast path where training runs in bf16 (Newton-Schulz in bf16) against the fp32
    reference, on the default model's matrix shapes and a full-rank momentum: the same
    update direction (cosine > 0.999) and the same size (2%)."""
    torch.manual_seed(0)
    g = torch.randn(2, *shape) @ torch.diag(torch.logspace(0, -2, shape[1]))  # uneven spectrum, like a gradient
    ref, fast = orthogonalize(g), orthogonalize(g, dtype=torch.bfloat16)
    assert fast.dtype == torch.float32 and not torch.equal(fast, ref)  # bf16 really ran
    cosine = torch.nn.functional.cosine_similarity(fast.flatten(1), ref.flatten(1), dim=1)
    assert cosine.min() > 0.999
    assert torch.allclose(fast.norm(dim=(1, 2)), ref.norm(dim=(1, 2)), rtol=0.02)


@pytest.mark.parametrize("shape", [(256, 256), (256, 1024), (1024, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_keeps_a_low_rank_momentum_in_the_band(shape, dtype):
    """A momentum of rank 2 plus noise, as on a plateau early in training: no singular value
    of the update may leave Muon's band, in either precision. (The Gram form in bf16 made
    such an update 60-100 times too large, and a grid fit with it stalled.)"""
    torch.manual_seed(0)
    low_rank = torch.randn(shape[0], 2) @ torch.randn(2, shape[1])
    g = low_rank + 1e-3 * low_rank.std() * torch.randn(shape)
    assert torch.linalg.svdvals(orthogonalize(g, dtype=dtype)).max() < 1.25


def test_make_optimizer_orthogonalizes_in_the_dtype_asked():
    model = build_model(ModelConfig(num_encoder_layers=1, num_decoder_layers=1, dim=32, ffn_dim=64, num_heads=4), 24)
    for dtype in (torch.float32, torch.bfloat16):
        assert make_optimizer(model, 1e-3, 1e-4, torch.device("cpu"), "muon", ns_dtype=dtype).muon.ns_dtype == dtype


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))], lr=1e-3)


def test_muon_update_has_adamw_size_and_decays_weights():
    """One step from zero momentum: RMS of the move is about 0.2 lr (the match_rms_adamw scale)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(256, 1024))
    before = w.detach().clone()
    opt = Muon([w], lr=1e-2, weight_decay=0.0)
    w.grad = torch.randn_like(w)
    opt.step()
    rms = (w.detach() - before).pow(2).mean().sqrt().item()
    assert 0.15e-2 < rms < 0.25e-2
    decayed = torch.nn.Parameter(torch.ones(8, 8))
    opt = Muon([decayed], lr=0.1, weight_decay=0.5)
    decayed.grad = torch.zeros_like(decayed)
    opt.step()
    assert torch.allclose(decayed.detach(), torch.full((8, 8), 0.95))


def test_muon_moves_a_tall_matrix_as_its_transposed_twin():
    """A tall matrix joins the batch of the wide shape it transposes to (a feed-forward
    block's two matrices): its step must be the twin's step, transposed, and one alone
    must take the same step as in the batch."""
    torch.manual_seed(0)
    wide = torch.nn.Parameter(torch.randn(16, 48))
    tall = torch.nn.Parameter(wide.detach().mT.clone())
    alone = torch.nn.Parameter(tall.detach().clone())
    grad = torch.randn(16, 48)
    before = tall.detach().clone()
    wide.grad, tall.grad, alone.grad = grad.clone(), grad.mT.clone(), grad.mT.clone()
    Muon([wide, tall], lr=1e-2, weight_decay=1e-2).step()
    Muon([alone], lr=1e-2, weight_decay=1e-2).step()
    assert (tall.detach() - before).abs().max() > 1e-3  # it moved
    assert torch.allclose(tall.detach(), wide.detach().mT, atol=1e-6)
    assert torch.allclose(alone.detach(), tall.detach(), atol=1e-6)


def test_muon_rms_sets_the_update_size_and_old_states_keep_0_2():
    """``rms`` scales the step (0.8: four times AdamW's size); an optimiser state saved before
    the option existed loads with 0.2, the size it trained with."""
    torch.manual_seed(0)
    grad = torch.randn(256, 1024)
    moves = {}
    for rms in (0.2, 0.8):
        w = torch.nn.Parameter(torch.zeros(256, 1024))
        opt = Muon([w], lr=1e-2, rms=rms)
        w.grad = grad.clone()
        opt.step()
        moves[rms] = w.detach().pow(2).mean().sqrt().item()
    assert moves[0.8] == pytest.approx(4 * moves[0.2], rel=1e-5)
    assert 0.6e-2 < moves[0.8] < 1.0e-2
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["rms"]
    w = torch.nn.Parameter(torch.zeros(256, 1024))
    fresh = Muon([w], lr=1e-2, rms=0.8)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["rms"] == 0.2


def test_muon_adamw_splits_the_model():
    """Muon takes exactly the transformer's weight matrices; AdamW everything else; the
    engine's learning-rate setting reaches both."""
    model = build_model(ModelConfig(num_encoder_layers=1, num_decoder_layers=1, dim=32, ffn_dim=64, num_heads=4), 24)
    opt = make_optimizer(model, 1e-3, 1e-4, torch.device("cpu"), "muon")
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names)
    assert {names[i] for i in muon} == {n for n, p in model.named_parameters()
                                       if n.startswith("transformer.") and n.endswith(".weight") and p.ndim == 2}
    assert "pos_embed" in {names[i] for i in adamw}
    for group in opt.param_groups:
        group["lr"] = 0.5
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == 0.5


def test_muon_fit_resumes_like_an_uninterrupted_one(tiny_category, tmp_path):
    """The optimiser's state (both halves) goes into last.pt and comes back."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = with_overrides(tiny_config(epochs=3, checkpoint_seconds=0.0), "train", optimizer="muon")
    fit(cfg, samples, tmp_path / "full")

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, samples, tmp_path / "cut", on_epoch=stop_after_two)
    assert set(ckpt_io.load_checkpoint(tmp_path / "cut" / "last.pt")["optimizer"]) == {"muon", "adamw"}
    fit(cfg, samples, tmp_path / "cut", resume=True)
    a = ckpt_io.load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = ckpt_io.load_checkpoint(tmp_path / "cut" / "model.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    adamw = ckpt_io.load_checkpoint(tmp_path / "full" / "model.pt")
    assert adamw["config"]["train"]["optimizer"] == "muon"


def test_the_gram_form_for_wide_matrices_equals_the_plain_iteration():
    from adtr.optim import NEWTON_SCHULZ

    a, b, c = NEWTON_SCHULZ
    torch.manual_seed(0)
    g = torch.randn(3, 32, 128, dtype=torch.float64)
    x = g / g.norm(dim=(-2, -1), keepdim=True)
    for _ in range(5):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    assert torch.allclose(orthogonalize(g, dtype=torch.float64), x, atol=1e-10)
    assert torch.allclose(orthogonalize(g.mT, dtype=torch.float64), x.mT, atol=1e-10)  # tall: transposed


def test_muon_leaves_a_model_without_transformer_matrices_to_adamw():
    """Table 4's CNN reconstructor has convolutions only: Muon has nothing to take."""
    model = build_model(ModelConfig(reconstructor="cnn", dim=32), 24)
    opt = make_optimizer(model, 1e-3, 1e-4, torch.device("cpu"), "muon")
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
