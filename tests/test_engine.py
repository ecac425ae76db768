from __future__ import annotations

import pytest
import torch

from adtr import checkpoint as ckpt_io
from adtr.data import index_mvtec
from adtr.engine import autocast, batch_order, fit, lr_factor, resolve_precision, split_train_val
from adtr.errors import AdtrError

from conftest import tiny_config


def test_split_is_seeded_and_disjoint(tiny_category):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    a_train, a_val = split_train_val(samples, 0.25, seed=3)
    b_train, b_val = split_train_val(samples, 0.25, seed=3)
    assert a_val == b_val and len(a_val) == 3 and len(a_train) == 9
    assert not set(a_val) & set(a_train)
    assert split_train_val(samples, 0.25, seed=4)[1] != a_val


def test_schedules():
    assert lr_factor("step", 79, 100, 0) == 1.0 and lr_factor("step", 80, 100, 0) == 0.1
    assert lr_factor("warmup-cosine", 0, 100, 10) == pytest.approx(0.1)
    assert lr_factor("warmup-cosine", 10, 100, 10) == pytest.approx(1.0)
    assert lr_factor("warmup-cosine", 100, 100, 10) == pytest.approx(0.01)
    with pytest.raises(AdtrError):
        lr_factor("nope", 0, 1, 0)


def test_batch_order_depends_only_on_seed_and_epoch():
    a = batch_order(20, 8, 1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, batch_order(20, 8, 1, 5)))
    assert sorted(torch.cat(a).tolist()) == list(range(20))  # last batch of 4 >= 8 // 2 is kept
    assert not torch.equal(a[0], batch_order(20, 8, 1, 6)[0])


def test_fit_writes_model_and_is_deterministic(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    r1 = fit(tiny_config(), samples, tmp_path / "a")
    r2 = fit(tiny_config(), samples, tmp_path / "b")
    a = ckpt_io.load_checkpoint(tmp_path / "a" / "model.pt")
    b = ckpt_io.load_checkpoint(tmp_path / "b" / "model.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert r1.threshold == r2.threshold and r1.epochs == 3
    assert not (tmp_path / "a" / "last.pt").exists()
    assert a["config"]["model"]["backbone"] == "tf_efficientnet_lite0"
    assert a["versions"]["torch"] == torch.__version__
    with pytest.raises(AdtrError, match="already holds a run"):
        fit(tiny_config(), samples, tmp_path / "a")


def test_resume_after_interruption_matches_uninterrupted(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = tiny_config(epochs=4)
    fit(cfg, samples, tmp_path / "full")

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, samples, tmp_path / "cut", on_epoch=stop_after_two)
    # on_epoch runs before the epoch's checkpoint: epoch 1 is saved, epoch 2 is lost (at most one).
    assert ckpt_io.load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    with pytest.raises(AdtrError, match="did not finish"):
        ckpt_io.find_run_file(tmp_path / "cut")
    fit(cfg, samples, tmp_path / "cut", resume=True)
    a = ckpt_io.load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = ckpt_io.load_checkpoint(tmp_path / "cut" / "model.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_category):
    with pytest.raises(AdtrError, match="nothing to resume"):
        fit(tiny_config(), [], tmp_path / "none", resume=True)


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(AdtrError, match="unknown precision"):
        autocast("fp16x", cpu)


def test_time_budget_limits_epochs(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    result = fit(tiny_config(epochs=10_000, max_minutes=0.02), samples, tmp_path / "r")
    assert 1 <= result.epochs < 10_000


def test_best_validation_epoch_is_selected(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    result = fit(tiny_config(epochs=4, lr=3e-3), samples, tmp_path / "best")
    val = [h["val_loss"] for h in result.history]
    assert result.selected_epoch == 1 + val.index(min(val))
    ckpt = ckpt_io.load_checkpoint(tmp_path / "best" / "model.pt")
    assert ckpt["calibration"]["selected_epoch"] == result.selected_epoch
    last = fit(tiny_config(epochs=4, lr=3e-3, select="last"), samples, tmp_path / "last")
    assert last.selected_epoch == 4


def test_resume_refuses_other_images(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")

    def stop(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(epochs=3), samples, tmp_path / "r", on_epoch=stop)
    with pytest.raises(AdtrError, match="other training images"):
        fit(tiny_config(epochs=3), samples[:-1], tmp_path / "r", resume=True)


def test_unknown_selection_fails_before_training(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    with pytest.raises(AdtrError, match="unknown selection"):
        fit(tiny_config(select="best"), samples, tmp_path / "r")
    assert not (tmp_path / "r").exists()
