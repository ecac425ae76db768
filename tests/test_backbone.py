from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adtr.errors import AdtrError
from adtr.models.backbone import FrozenBackbone, PixelPatches, create_classifier, map_state_dict_in_order


def test_channels_and_grid_match_output():
    bb = FrozenBackbone("tf_efficientnet_lite0", weights="none", stages=(0, 2, 4), grid_stride=16)
    out = bb(torch.rand(2, 3, 128, 128))
    assert bb.channels == (16, 40, 320)
    assert bb.reductions == (2, 8, 32)
    assert out.shape == (2, 16 + 40 + 320, 8, 8)
    assert bb.grid_size(128) == 8


def test_frozen_and_always_eval():
    bb = FrozenBackbone("tf_efficientnet_lite0", weights="none", stages=(0, 1))
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    assert not any(p.requires_grad for p in bb.parameters())
    running = [m.running_mean.clone() for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bb(torch.rand(2, 3, 64, 64) * 5)
    after = [m.running_mean for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))


def test_bad_stage_and_stride_are_clear_errors():
    with pytest.raises(AdtrError, match="stages"):
        FrozenBackbone("tf_efficientnet_lite0", weights="none", stages=(7,))
    bb = FrozenBackbone("tf_efficientnet_lite0", weights="none", stages=(0,))
    with pytest.raises(AdtrError, match="multiple"):
        bb.grid_size(100)


def test_a_hub_hosted_name_is_refused_before_timm_sees_it(monkeypatch):
    """A downloaded checkpoint could carry ``hf-hub:someone/model``, for which timm fetches a
    config from the internet even for weights="none"."""
    import timm

    def no_network(*args, **kwargs):
        raise AssertionError("timm.create_model was called")

    monkeypatch.setattr(timm, "create_model", no_network)
    for name in ("hf-hub:someone/beacon", "timm/resnet50.a1_in1k"):
        for weights in ("none", "hub"):
            with pytest.raises(AdtrError, match=r"unknown timm backbone .*give one of timm\.list_models\(\)"):
                create_classifier(name, weights)


def test_unknown_model_and_unpackaged_weights():
    with pytest.raises(AdtrError, match="unknown timm backbone"):
        create_classifier("no_such_net", "none")
    with pytest.raises(AdtrError, match="no packaged weights"):
        create_classifier("resnet18", "packaged")


def test_in_order_mapping_checks_shapes():
    src = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert list(map_state_dict_in_order(src, {"x": torch.ones(2, 3), "y": torch.ones(4)})) == ["x", "y"]
    with pytest.raises(AdtrError, match="does not fit"):
        map_state_dict_in_order(src, {"x": torch.ones(4), "y": torch.ones(2, 3)})
    with pytest.raises(AdtrError, match="tensors"):
        map_state_dict_in_order(src, {"x": torch.ones(2, 3)})


def test_local_weight_file(tmp_path):
    net = create_classifier("tf_efficientnet_lite0", "none")
    path = tmp_path / "w.pth"
    torch.save(net.state_dict(), path)
    bb = FrozenBackbone("tf_efficientnet_lite0", weights=str(path), stages=(0,))
    assert torch.equal(bb.body.conv_stem.weight, net.conv_stem.weight)
    with pytest.raises(AdtrError, match="not found"):
        FrozenBackbone("tf_efficientnet_lite0", weights=str(tmp_path / "missing.pth"))


def test_packaged_weights_classify_real_photos():
    """The packaged weights are real ImageNet weights: scikit-image's photos are classified right."""
    skdata = pytest.importorskip("skimage.data")
    net = create_classifier("tf_efficientnet_lite0", "packaged").eval()
    cfg = net.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    hits = 0
    for image, classes in [(skdata.chelsea(), range(281, 286)), (skdata.coffee(), [967])]:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            top = int(net((x - mean) / std).argmax())
        hits += top in classes
    assert hits == 2


def test_pixel_patches_shape_and_interface():
    pp = PixelPatches(16)
    out = pp(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 768, 16, 16)
    assert (pp.name, pp.stages, pp.grid_stride, pp.channels, pp.out_channels) == ("pixels", (), 16, (768,), 768)
    assert pp.grid_size(256) == 16
    with pytest.raises(AdtrError, match="multiple"):
        pp.grid_size(100)
    assert pp.body.state_dict() == {} and list(pp.parameters()) == []
    pp.body.load_state_dict({})
    pp.train()
    assert not pp.training and not out.requires_grad


def test_pixel_patches_values():
    """Channel c*s*s + i*s + j of cell (y, x) is colour c of pixel (y*s + i, x*s + j), scaled to [-1, 1]."""
    img = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6) / 143
    out = PixelPatches(2)(img)
    assert out.shape == (2, 12, 2, 3)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([
        img[0, c, i, j] * 2 - 1 for c in range(3) for i in range(2) for j in range(2)]))
    assert torch.allclose(out[1, 2 * 4 + 1 * 2 + 0, 1, 2], img[1, 2, 3, 4] * 2 - 1)
    assert torch.equal(PixelPatches(1)(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)).flatten(),
                       torch.tensor([-1.0, 0.0, 1.0]))


def test_channels_last_backbone_matches_the_contiguous_reference():
    """The NHWC fast path gives the features of the plain NCHW network, in NCHW layout."""
    bb = FrozenBackbone("tf_efficientnet_lite0", weights="packaged")
    assert bb.body.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    fast = bb(images)
    bb.body.to(memory_format=torch.contiguous_format)
    x = (images - bb.mean) / bb.std
    with torch.no_grad():
        reference = torch.cat([F.adaptive_avg_pool2d(f, (8, 8)) if f.shape[-1] > 8 else
                               F.interpolate(f, size=(8, 8), mode="bilinear", align_corners=False)
                               for f in bb.body(x.contiguous())], dim=1)
    assert fast.is_contiguous()
    assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_blocks_after_the_last_stage_are_dropped_without_changing_features():
    import timm

    bb = FrozenBackbone("tf_efficientnet_lite0", weights="packaged", stages=(1, 2, 3))
    whole = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    assert len(bb.body.blocks) == 5 and len(whole.blocks) == 7  # stage 3 ends after blocks.4
    missing = whole.load_state_dict(bb.body.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("blocks.5.", "blocks.6.")) for k in missing)
    whole.eval().to(memory_format=torch.channels_last)  # the same layout, so the same kernels
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for ours, reference in zip(bb.body(images), whole(images)):
            assert torch.equal(ours, reference)
    assert len(FrozenBackbone("tf_efficientnet_lite0", weights="none").body.blocks) == 7  # stage 4 needs all
    assert len(FrozenBackbone("tf_efficientnet_lite0", weights="none", stages=(0,)).body.blocks) == 1
