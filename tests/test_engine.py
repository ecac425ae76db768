from __future__ import annotations

import logging
import re
import time
import types
from collections.abc import Callable

import numpy as np
import pytest
import torch

from adtr import checkpoint as ckpt_io
from adtr.config import RunConfig, TrainConfig, plus_config, with_overrides
from adtr.data import Sample, index_mvtec
from adtr.detector import Detector
from adtr.engine import (autocast, batch_order, bf16_is_fast, build_model, fit, fit_optimizer, full_rate_end,
                         lr_factor, may_replan, newton_schulz_dtype, replan_epochs, resolve_precision,
                         restore_networks, split_train_val)
from adtr.errors import AdtrError
from adtr.optim import MuonAdamW

from conftest import tiny_config


def test_split_is_seeded_and_disjoint(tiny_category):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    a_train, a_val = split_train_val(samples, 0.25, seed=3)
    b_train, b_val = split_train_val(samples, 0.25, seed=3)
    assert a_val == b_val and len(a_val) == 3 and len(a_train) == 9
    assert not set(a_val) & set(a_train)
    assert split_train_val(samples, 0.25, seed=4)[1] != a_val


def test_a_positive_val_fraction_holds_out_at_least_one_image(tiny_category):
    """10% of 4 images rounds to none, which would leave fit without a threshold."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")[:4]
    train, val = split_train_val(samples, 0.1, seed=0)
    assert len(val) == 1 and len(train) == 3
    assert split_train_val(samples, 0.0, seed=0) == (samples, [])
    with pytest.raises(AdtrError, match="at least 2 training images"):
        split_train_val(samples[:1], 0.1, seed=0)


def test_schedules():
    assert lr_factor("step", 79, 100, 0) == 1.0 and lr_factor("step", 80, 100, 0) == 0.1
    assert lr_factor("step", 65, 100, 0, step_at=2 / 3) == 1.0 and lr_factor("step", 66, 100, 0, 2 / 3) == 0.1
    assert lr_factor("warmup-cosine", 0, 100, 10) == pytest.approx(0.1)
    assert lr_factor("warmup-cosine", 10, 100, 10) == pytest.approx(1.0)
    assert lr_factor("warmup-cosine", 100, 100, 10) == pytest.approx(0.01)
    with pytest.raises(AdtrError, match="warmup-stable-decay"):
        lr_factor("nope", 0, 1, 0)


def test_warmup_stable_decay_holds_the_full_rate_until_step_at_then_decays_linearly():
    factors = [lr_factor("warmup-stable-decay", s, 100, 10, step_at=0.8) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # warm-up as warmup-cosine's
    assert all(f == 1.0 for f in factors[10:81])
    assert factors[90] == pytest.approx(0.505) and factors[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(factors[80:], factors[81:]))
    # more of the steps at the full rate than cosine, the point of the schedule
    assert sum(factors) > sum(lr_factor("warmup-cosine", s, 100, 10) for s in range(101)) + 20
    # a warm-up longer than step_at: the decay starts when the warm-up ends
    assert lr_factor("warmup-stable-decay", 49, 100, 50, step_at=0.2) == pytest.approx(1.0)
    assert lr_factor("warmup-stable-decay", 75, 100, 50, step_at=0.2) == pytest.approx(0.505)


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


def interrupt_after_epoch_two(cfg, samples, run):
    """Start a fit and stop it as Ctrl-C would, during epoch 2's bookkeeping."""

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, samples, run, on_epoch=stop_after_two)


def test_fit_trains_with_the_configured_muon_step(tiny_category, tmp_path):
    """``--muon-rms`` reaches the optimiser whose state ``last.pt`` keeps for a resume."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = tiny_config(epochs=4, checkpoint_seconds=0.0, optimizer="muon", muon_rms=0.5)
    interrupt_after_epoch_two(cfg, samples, tmp_path / "cut")
    state = ckpt_io.load_checkpoint(tmp_path / "cut" / "last.pt")["optimizer"]
    assert [group["rms"] for group in state["muon"]["param_groups"]] == [0.5]


@pytest.mark.parametrize("checkpoint_seconds, saved_epoch", [(0.0, 1), (3600.0, 0)])
def test_resume_after_interruption_matches_uninterrupted(tiny_category, tmp_path, checkpoint_seconds, saved_epoch):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = tiny_config(epochs=4, checkpoint_seconds=checkpoint_seconds)
    fit(cfg, samples, tmp_path / "full")
    interrupt_after_epoch_two(cfg, samples, tmp_path / "cut")
    # on_epoch runs before the epoch's checkpoint: with a checkpoint after every epoch, epoch 1
    # is saved and epoch 2 is lost (at most one); with an hour between writes, only epoch 0 is.
    assert ckpt_io.load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == saved_epoch
    with pytest.raises(AdtrError, match="did not finish"):
        ckpt_io.find_run_file(tmp_path / "cut")
    fit(cfg, samples, tmp_path / "cut", resume=True)
    a = ckpt_io.load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = ckpt_io.load_checkpoint(tmp_path / "cut" / "model.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("checkpoint_seconds, epoch_sleep, saved", [
    (0.0, 0.0, [0, 1, 2, 3, 4]),  # after every epoch
    (3600.0, 0.0, [0, 4]),  # short epochs: the start and the final epoch only
    (0.2, 0.25, [0, 1, 2, 3, 4]),  # epochs longer than the interval: every one
])
def test_checkpoint_interval(tiny_category, tmp_path, monkeypatch, checkpoint_seconds, epoch_sleep, saved):
    """last.pt is written at the start, then after the first epoch that ends ``checkpoint_seconds``
    after the previous write, and after the final epoch."""
    written = []
    real_save = ckpt_io.atomic_save

    def spy(obj, path):
        if path.name == ckpt_io.LAST_FILE:
            written.append(obj["epoch"])
        real_save(obj, path)

    monkeypatch.setattr(ckpt_io, "atomic_save", spy)
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    fit(tiny_config(epochs=4, checkpoint_seconds=checkpoint_seconds), samples, tmp_path / "r",
        on_epoch=lambda record: time.sleep(epoch_sleep))
    assert written == saved
    assert not (tmp_path / "r" / ckpt_io.LAST_FILE).exists() and (tmp_path / "r" / ckpt_io.MODEL_FILE).exists()


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_category):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    with pytest.raises(AdtrError, match="nothing to resume"):
        fit(tiny_config(), samples, tmp_path / "none", resume=True)


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(AdtrError, match="unknown precision"):
        autocast("fp16x", cpu)


def test_muon_orthogonalizes_in_the_training_precision():
    """bf16 Newton-Schulz only where training runs in bf16; fp32 stays the reference throughout."""
    cpu = torch.device("cpu")
    assert newton_schulz_dtype("fp32", cpu) == torch.float32
    assert newton_schulz_dtype("bf16", cpu) == torch.bfloat16
    assert newton_schulz_dtype("auto", cpu) == (torch.bfloat16 if bf16_is_fast(cpu) else torch.float32)


def test_fit_optimizer_takes_every_setting_from_the_train_config():
    """fit, its epoch estimate and the benchmarks build the optimiser here: a setting dropped on the
    way (as feature_cache.py once dropped muon_rms and the Newton-Schulz precision) fails this."""
    cpu = torch.device("cpu")
    model = build_model(tiny_config().model, 8)
    tc = with_overrides(tiny_config(), "train", lr=3e-4, weight_decay=2e-3, muon_rms=0.5, precision="fp32").train
    opt = fit_optimizer(model, tc, cpu)
    assert isinstance(opt, MuonAdamW) and opt.muon.ns_dtype == torch.float32
    for inner in (opt.muon, opt.adamw):
        assert {(g["lr"], g["weight_decay"]) for g in inner.param_groups} == {(3e-4, 2e-3)}
    assert {g["rms"] for g in opt.muon.param_groups} == {0.5}
    probe = fit_optimizer(model, tc, cpu, lr=0.0, precision="bf16")
    assert probe.muon.ns_dtype == torch.bfloat16 and probe.muon.param_groups[0]["lr"] == 0.0
    adamw = fit_optimizer(model, with_overrides(tiny_config(), "train", optimizer="adamw", lr=3e-4).train, cpu)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 3e-4


def test_time_budget_limits_epochs(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    result = fit(tiny_config(epochs=10_000, max_minutes=0.02), samples, tmp_path / "r")
    assert 1 <= result.epochs < 10_000
    assert len(result.history) == result.epochs  # the re-planned count is the one trained


def test_budget_is_kept_when_the_machine_slows_down(tiny_category, tmp_path):
    """Epochs planned for a fast machine, then each one takes 2 s longer (a stand-in for other
    work on the machine): the fit stops inside its 4 s budget and still writes a model."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    result = fit(tiny_config(epochs=50, max_minutes=4 / 60), samples, tmp_path / "r",
                 on_epoch=lambda record: time.sleep(2.0))
    assert 1 <= result.epochs <= 2 and len(result.history) == result.epochs
    assert (tmp_path / "r" / "model.pt").is_file()


def test_a_fit_stopped_early_and_killed_while_calibrating_resumes_without_training(tiny_category, tmp_path,
                                                                                   monkeypatch):
    """Patience stops the fit after 3 of 50 planned epochs (the held-out loss never improves on
    epoch 1's); a kill during calibration leaves last.pt, and the resume calibrates the epochs
    trained instead of training on."""
    import adtr.engine

    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = tiny_config(epochs=50, patience=2)
    rising = iter(range(1, 1000))
    monkeypatch.setattr(adtr.engine, "mean_loss", lambda *args, **kwargs: float(next(rising)))
    real_calibration = adtr.engine.fpr_calibration

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adtr.engine, "fpr_calibration", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, samples, tmp_path / "r")
    state = ckpt_io.load_checkpoint(tmp_path / "r" / ckpt_io.LAST_FILE)
    assert state["epoch"] == 3 and state["epochs"] == 3
    monkeypatch.setattr(adtr.engine, "fpr_calibration", real_calibration)
    result = fit(cfg, samples, tmp_path / "r", resume=True)
    assert result.epochs == 3 and result.selected_epoch == 1
    assert (tmp_path / "r" / ckpt_io.MODEL_FILE).is_file() and not (tmp_path / "r" / ckpt_io.LAST_FILE).exists()


def virtual_clock(monkeypatch, validation_seconds: Callable[[int], float]) -> types.SimpleNamespace:
    """Make ``fit`` read a virtual clock, 1 ms per reading, on which its n-th validation pass
    takes ``validation_seconds(n)``: a budget's arithmetic then does not depend on how loaded
    the machine running the test is. Returns the clock (``.now``, seconds)."""
    import adtr.engine

    clock = types.SimpleNamespace(now=0.0)

    def perf_counter():
        clock.now += 1e-3
        return clock.now

    real_mean_loss, calls = adtr.engine.mean_loss, []

    def timed_mean_loss(*args, **kwargs):
        calls.append(1)
        clock.now += validation_seconds(len(calls))
        return real_mean_loss(*args, **kwargs)

    monkeypatch.setattr(adtr.engine, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(adtr.engine, "mean_loss", timed_mean_loss)
    return clock


def budget_config() -> RunConfig:
    """A fit of up to 1000 epochs in a 125 s budget (on the virtual clock) with a one-layer,
    32-wide transformer: the budget tests check the engine's arithmetic, which the model's
    size does not enter, and with the default transformer they took 10-45 s each."""
    return with_overrides(tiny_config(epochs=1000, max_minutes=125 / 60), "model", dim=32, num_heads=2,
                          ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1)


def test_budget_replans_when_later_epochs_are_slower(tiny_category, tmp_path, monkeypatch):
    """A first epoch much faster than the rest (here: validation slows down from the second
    epoch on): re-planning over the first epochs fits the whole schedule into the budget, so
    training ends with the learning rate decayed instead of being cut short by the budget.

    The fit reads a virtual clock (10 s per slow validation)."""
    virtual_clock(monkeypatch, lambda n: 10.0 if n > 1 else 0.0)
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = budget_config()
    result = fit(cfg, samples, tmp_path / "r")
    # 10 s an epoch and 20 s kept for calibration: 11 epochs in 125 s.
    assert 2 <= result.epochs < 15
    # The schedule ran to its end: the last step's rate is the schedule's final one, below the
    # peak. Planned from the first epoch alone (1000 epochs), the budget would stop it early,
    # still warming up.
    tc = cfg.train
    steps_per_epoch = len(batch_order(len(split_train_val(samples, tc.val_fraction, tc.seed)[0]), tc.batch_size,
                                      tc.seed, 0))
    total = result.epochs * steps_per_epoch
    last = tc.lr * lr_factor(tc.schedule, total - 1, total, int(tc.warmup_fraction * total), tc.step_at)
    assert result.history[-1]["lr"] == pytest.approx(last) and last < 0.8 * tc.lr


def test_budget_replans_when_later_epochs_are_faster(tiny_category, tmp_path, monkeypatch):
    """The first six epochs slow (other work on a shared machine), the rest five times faster:
    the fit keeps re-planning while its learning rate is at the peak, so it uses its budget
    instead of ending with the plan of its first five epochs (10 epochs, about 70 of 125 s),
    and the rate never goes back up."""
    clock = virtual_clock(monkeypatch, lambda n: 10.0 if n <= 6 else 2.0)
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = budget_config()
    ends: list[float] = []
    result = fit(cfg, samples, tmp_path / "r", on_epoch=lambda record: ends.append(clock.now))
    assert 100 <= ends[-1] <= 125  # the budget used, not overrun
    assert result.epochs > 20 and result.history[-1]["epochs_planned"] == result.epochs == len(result.history)
    lrs = [record["lr"] for record in result.history]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # past the warm-up the rate only falls
    assert lrs[-1] < 0.2 * cfg.train.lr  # and the decay ran to its end


def test_budget_shrinks_the_plan_when_the_decay_slows_down(tiny_category, tmp_path, monkeypatch, caplog):
    """Epochs half as slow again once the rate has started to decay: the plan may no longer
    grow, but it shrinks, so the decay ends inside the budget with the schedule's final rate
    instead of the budget cutting it off part-way down (the rate still never rises)."""
    state = {"peak": False, "decaying": False}
    clock = virtual_clock(monkeypatch, lambda n: 3.0 if state["decaying"] else 2.0)
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = budget_config()
    ends: list[float] = []

    def on_epoch(record):
        ends.append(clock.now)
        state["peak"] = state["peak"] or record["lr"] >= 0.999 * cfg.train.lr
        state["decaying"] = state["peak"] and record["lr"] < 0.999 * cfg.train.lr

    with caplog.at_level(logging.WARNING, logger="adtr.engine"):
        result = fit(cfg, samples, tmp_path / "r", on_epoch=on_epoch)
    assert state["decaying"] and ends[-1] <= 125  # the slow-down happened; the budget held
    assert "budget is spent" not in caplog.text  # the plan ended the fit, not the budget's cut-off
    plans = [record["epochs_planned"] for record in result.history]
    lrs = [record["lr"] for record in result.history]
    first_peak = next(i for i, lr in enumerate(lrs) if lr >= 0.999 * cfg.train.lr)
    decay_from = next(i for i, lr in enumerate(lrs) if i > first_peak and lr < 0.999 * cfg.train.lr)
    assert plans[-1] == result.epochs == len(result.history) < plans[decay_from - 1]  # shrunk in the decay
    assert all(a >= b for a, b in zip(plans[decay_from:], plans[decay_from + 1:]))  # and never grew there
    assert all(a >= b for a, b in zip(lrs[first_peak:], lrs[first_peak + 1:]))  # past the warm-up it only falls
    assert lrs[-1] < 0.05 * cfg.train.lr  # the decay ran to its end (a plan fixed in the decay: cut 5 epochs short)


def test_may_replan_while_the_rate_is_at_its_peak():
    wsd = TrainConfig(schedule="warmup-stable-decay", step_at=0.8)
    # 100 epochs of 10 steps, warm-up 50 steps: the decay starts at step 800.
    assert may_replan(wsd, done=5, steps_per_epoch=10, total_steps=1000, warmup=50)
    assert may_replan(wsd, done=79, steps_per_epoch=10, total_steps=1000, warmup=50)
    assert not may_replan(wsd, done=80, steps_per_epoch=10, total_steps=1000, warmup=50)
    step = TrainConfig(schedule="step", step_at=0.5)
    assert may_replan(step, done=49, steps_per_epoch=10, total_steps=1000, warmup=0)
    assert not may_replan(step, done=50, steps_per_epoch=10, total_steps=1000, warmup=0)
    cosine = TrainConfig(schedule="warmup-cosine")  # decays from the end of its warm-up
    assert may_replan(cosine, done=5, steps_per_epoch=10, total_steps=1000, warmup=50)
    assert not may_replan(cosine, done=6, steps_per_epoch=10, total_steps=1000, warmup=50)
    assert full_rate_end("warmup-cosine", 1000, 50) == 50 and full_rate_end("step", 1000, 50, 0.5) == 500


def test_replan_counts_the_whole_fit_against_the_budget():
    cfg = TrainConfig(epochs=1000, max_minutes=10)
    # 100 s already spent on features and the first epoch, 20 s per epoch, 10 s kept for calibration.
    assert replan_epochs(cfg, elapsed_seconds=100, epoch_seconds=20, reserve_seconds=10) == 1 + 490 // 20
    assert replan_epochs(cfg, elapsed_seconds=700, epoch_seconds=20, reserve_seconds=10) == 1  # over budget
    assert replan_epochs(TrainConfig(epochs=5, max_minutes=10), 10, 1, 0) == 5  # --epochs still caps it
    # Re-planned after 3 epochs: those count as done.
    assert replan_epochs(cfg, elapsed_seconds=160, epoch_seconds=20, reserve_seconds=10, done=3) == 3 + 430 // 20
    assert replan_epochs(cfg, elapsed_seconds=900, epoch_seconds=20, reserve_seconds=10, done=3) == 3


def test_best_validation_epoch_is_selected(tiny_category, tmp_path, monkeypatch):
    """The held-out loss is scripted so that epoch 2 is best: model.pt must hold epoch 2's
    weights (as the validation pass saw them), not the last epoch's; ``select="last"`` the last."""
    import adtr.engine

    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    seen: list[dict[str, torch.Tensor]] = []  # the weights at each epoch's validation

    def scripted(losses):
        values = iter(losses)

        def mean_loss(model, *args, **kwargs):
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return next(values)
        return mean_loss

    def same(weights, other):
        return all(torch.equal(weights[k], other[k]) for k in weights)

    monkeypatch.setattr(adtr.engine, "mean_loss", scripted([1.0, 0.5, 2.0, 3.0]))
    result = fit(tiny_config(epochs=4, lr=3e-3), samples, tmp_path / "best")
    assert [h["val_loss"] for h in result.history] == [1.0, 0.5, 2.0, 3.0]
    assert result.selected_epoch == 2
    ckpt = ckpt_io.load_checkpoint(tmp_path / "best" / "model.pt")
    assert ckpt["calibration"]["selected_epoch"] == 2
    assert same(ckpt["model"], seen[1]) and not same(ckpt["model"], seen[3])

    seen.clear()
    monkeypatch.setattr(adtr.engine, "mean_loss", scripted([1.0, 0.5, 2.0, 3.0]))
    last = fit(tiny_config(epochs=4, lr=3e-3, select="last"), samples, tmp_path / "last")
    assert last.selected_epoch == 4
    weights = ckpt_io.load_checkpoint(tmp_path / "last" / "model.pt")["model"]
    assert same(weights, seen[3]) and not same(weights, seen[1])


def test_resume_refuses_other_images(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")

    def stop(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(epochs=3), samples, tmp_path / "r", on_epoch=stop)
    with pytest.raises(AdtrError, match="other training images"):
        fit(tiny_config(epochs=3), samples[:-1], tmp_path / "r", resume=True)
    with pytest.raises(AdtrError, match="or the same in another order"):
        fit(tiny_config(epochs=3), samples[::-1], tmp_path / "r", resume=True)


def test_resume_from_python_says_which_settings_it_ignores(tiny_category, tmp_path, caplog):
    """The run's saved config wins (a resumed run ends as the uninterrupted one would); a config
    that asks for something else is named in a warning, not dropped silently."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = tiny_config(epochs=3)
    interrupt_after_epoch_two(cfg, samples, tmp_path / "r")
    other = with_overrides(tiny_config(epochs=5, lr=1e-3), "score", target_fpr=0.2)
    with caplog.at_level(logging.WARNING, logger="adtr.engine"):
        result = fit(other, samples, tmp_path / "r", resume=True)
    assert result.epochs == 3 and result.calibration["target_fpr"] == cfg.score.target_fpr
    warning = next(r.getMessage() for r in caplog.records if "ignored" in r.getMessage())
    assert "train.epochs 5 (run: 3)" in warning and "train.lr 0.001 (run: 0.0005)" in warning
    assert "score.target_fpr 0.2 (run: 0.01)" in warning and "model." not in warning
    caplog.clear()
    interrupt_after_epoch_two(cfg, samples, tmp_path / "same")
    with caplog.at_level(logging.WARNING, logger="adtr.engine"):
        fit(cfg, samples, tmp_path / "same", resume=True)
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]


def test_devices_are_named_or_refused_in_one_line(tiny_category, tmp_path, monkeypatch):
    """A device given as a string works as torch.device does; a name torch does not know, or a
    GPU torch cannot see, is one AdtrError before any work, and the run folder is not left behind."""
    import adtr.engine

    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    assert fit(tiny_config(epochs=1), samples, tmp_path / "cpu", device="cpu").selected_epoch == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("gpu", "unknown device 'gpu' (use cpu, cuda or cuda:N)"),
                            ("cuda", "device 'cuda': torch sees no CUDA GPU here")):
        with pytest.raises(AdtrError, match=re.escape(message)):
            fit(tiny_config(epochs=1), samples, tmp_path / device, device=device)
        assert not (tmp_path / device).exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(AdtrError, match=re.escape("torch sees 2 CUDA GPUs (cuda:0 to cuda:1)")):
        adtr.engine.resolve_device("cuda:2")
    assert adtr.engine.resolve_device(torch.device("cuda:1")) == torch.device("cuda:1")


def test_any_failure_before_the_first_checkpoint_removes_the_new_run_folder(tiny_category, tmp_path, monkeypatch):
    """Not only bad input: a bug or an out-of-memory error while caching features, too."""
    import adtr.engine

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(adtr.engine, "extract_features", fails)
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(tiny_config(epochs=1), samples, tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def base_run(tiny_category, tmp_path_factory):
    """A tiny trained ADTR run to start ADTR+ from."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    run = tmp_path_factory.mktemp("base") / "run"
    fit(tiny_config(), samples, run)
    return run


def plus_cfg(base_run, **plus):
    return with_overrides(plus_config(tiny_config(), init=str(base_run), **{"loss": "pixel", **plus}),
                          "train", epochs=2)


def test_plus_confetti_fine_tunes_the_init_run(base_run, tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = plus_cfg(base_run, variants=2)
    result = fit(cfg, samples, tmp_path / "plus")
    saved = ckpt_io.load_checkpoint(tmp_path / "plus" / "model.pt")
    init = ckpt_io.load_checkpoint(base_run / "model.pt")
    assert saved["config"]["plus"]["loss"] == "pixel" and saved["config"]["model"] == init["config"]["model"]
    assert torch.equal(saved["model"]["feature_mean"], init["model"]["feature_mean"])  # started from the init run
    assert not torch.equal(saved["model"]["query_embed"], init["model"]["query_embed"])  # and trained
    assert result.selected_epoch == 2 and "pool_seconds" in result.history[0]
    assert [round(r["lr"] / 1e-4, 6) for r in result.history] == [1.0, 0.1]  # x0.1 for the last third
    det = Detector.load(tmp_path / "plus")  # the run folder alone is enough
    assert det.config.plus.loss == "pixel"


@pytest.mark.parametrize("split", [{"seed": 1}, {"val_fraction": 0.3}])
def test_plus_refuses_another_split_than_its_init_run(base_run, tiny_category, tmp_path, split):
    """Another hold-out would score images the init run trained on, and set the threshold too low."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    with pytest.raises(AdtrError, match="must hold out the images its init run held out"):
        fit(with_overrides(plus_cfg(base_run), "train", **split), samples, tmp_path / "plus")
    assert not (tmp_path / "plus").exists()


def test_plus_resume_redraws_the_same_pool(base_run, tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = with_overrides(plus_cfg(base_run, variants=1, refresh_every=1), "train", epochs=3)
    fit(cfg, samples, tmp_path / "full")
    interrupt_after_epoch_two(cfg, samples, tmp_path / "cut")
    fit(cfg, samples, tmp_path / "cut", resume=True)
    a = ckpt_io.load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = ckpt_io.load_checkpoint(tmp_path / "cut" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def spy_on_plus_losses(monkeypatch) -> dict[str, list[tuple]]:
    """Record what each ADTR+ loss is called with during a fit (and still compute it)."""
    import adtr.engine

    calls: dict[str, list[tuple]] = {"pixel": [], "image": []}
    pixel, image = adtr.engine.pixel_push_pull_loss, adtr.engine.image_push_pull_loss

    def pixel_spy(phi, labels, alpha):
        calls["pixel"].append((phi.shape, labels.detach().clone(), alpha))
        return pixel(phi, labels, alpha)

    def image_spy(phi, labels, k, alpha):
        calls["image"].append((phi.shape, labels.detach().clone(), k, alpha))
        return image(phi, labels, k, alpha)

    monkeypatch.setattr(adtr.engine, "pixel_push_pull_loss", pixel_spy)
    monkeypatch.setattr(adtr.engine, "image_push_pull_loss", image_spy)
    return calls


def test_plus_with_real_defects_and_outliers(base_run, tiny_category, tmp_path, monkeypatch):
    """Each ADTR+ loss is the one that trains: the pixel loss sees the defects' real masks on
    the cells they cover (some cells, not whole images), the image loss the outliers' labels and k."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    defects = [s for s in index_mvtec(tiny_category.parent, tiny_category.name, "test") if s.label == 1]
    calls = spy_on_plus_losses(monkeypatch)
    fit(plus_cfg(base_run, source="defects", alpha=0.01), samples, tmp_path / "px", anomalies=defects)
    assert calls["pixel"] and not calls["image"]
    labels = torch.cat([c[1] for c in calls["pixel"]])  # (samples, h, w) per cell
    per_sample = labels.flatten(1).amax(1)
    assert 0 < per_sample.sum() < len(per_sample)  # some samples replaced by a defect, not all
    assert float(labels[per_sample > 0].mean()) < 1  # a defect covers some cells, not the whole image
    assert {c[2] for c in calls["pixel"]} == {0.01} and all(c[0] == c[1].shape for c in calls["pixel"])
    calls["pixel"].clear()
    outliers = [Sample(image=s.image, label=1, defect_type="outlier", mask=None) for s in defects]
    fit(plus_cfg(base_run, loss="image", source="outliers", topk=3), samples, tmp_path / "img", anomalies=outliers)
    assert calls["image"] and not calls["pixel"]
    image_labels = torch.cat([c[1] for c in calls["image"]])
    assert 0 < image_labels.sum() < len(image_labels) and {c[2] for c in calls["image"]} == {3}
    assert Detector.load(tmp_path / "img").config.plus.topk == 3
    with pytest.raises(AdtrError, match="only image labels"):
        fit(plus_cfg(base_run, source="outliers"), samples, tmp_path / "bad", anomalies=outliers)
    with pytest.raises(AdtrError, match="has no defect mask"):
        fit(plus_cfg(base_run, source="defects"), samples, tmp_path / "bad2", anomalies=outliers)
    with pytest.raises(AdtrError, match="needs its images"):
        fit(plus_cfg(base_run, source="defects"), samples, tmp_path / "bad3")
    with pytest.raises(AdtrError, match="--init"):
        fit(with_overrides(RunConfig(), "plus", loss="pixel"), samples, tmp_path / "bad4")


def test_fit_on_an_image_array(tmp_path):
    images = (np.random.default_rng(0).random((10, 32, 32, 3)) * 255).astype(np.uint8)
    cfg = with_overrides(tiny_config(), "model", image_size=32, grid_stride=8)
    result = fit(cfg, images, tmp_path / "arr")
    assert result.epochs == 3 and Detector.load(tmp_path / "arr").image_size == 32
    with pytest.raises(AdtrError, match="other training images"):
        (tmp_path / "arr2").mkdir()
        ckpt = ckpt_io.load_checkpoint(tmp_path / "arr" / "model.pt")
        ckpt_io.atomic_save({**ckpt, "kind": "training", "images": ["array:other"], "epoch": 1, "epochs": 3},
                            tmp_path / "arr2" / "last.pt")
        fit(cfg, images, tmp_path / "arr2", resume=True)


def stop_after_first_epoch(record):
    if record["epoch"] == 1:
        raise KeyboardInterrupt


def test_fit_takes_a_folder_and_resumes_from_a_list_of_its_paths(tiny_category, tmp_path):
    """A folder goes through `adtr fit`'s resolution (a str used to fail with AttributeError), and a
    resume compares the images themselves: the same files given as a list of paths go on."""
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(epochs=2), str(tiny_category), tmp_path / "run", on_epoch=stop_after_first_epoch)
    paths = [str(p) for p in sorted((tiny_category / "train" / "good").glob("*.png"))]
    result = fit(tiny_config(epochs=2), paths, tmp_path / "run", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_fit_takes_grey_and_float_arrays_and_lists_of_them(tmp_path):
    """A grey uint8 (N, H, W) batch (refused before) trains, read as predict reads it; the same
    images as a list of float arrays in [0, 1] are the same training images to a resume."""
    grey = (np.random.default_rng(0).random((10, 32, 32)) * 255).astype(np.uint8)
    cfg = with_overrides(tiny_config(epochs=2), "model", image_size=32, grid_stride=8)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, grey, tmp_path / "run", on_epoch=stop_after_first_epoch)
    result = fit(cfg, list(grey / 255.0), tmp_path / "run", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_fit_refuses_defective_samples_and_misshapen_arrays_before_any_work(tiny_category, tmp_path):
    test = index_mvtec(tiny_category.parent, tiny_category.name, "test")
    with pytest.raises(AdtrError, match=r"fit needs good images only \(label 0\): 8 of the 12 training samples are "
                                        r"labelled defective \(crack, hole, scratch, spot\)"):
        fit(tiny_config(), test, tmp_path / "bad")
    chw = np.zeros((8, 3, 32, 32), np.uint8)
    with pytest.raises(AdtrError, match=r"array of shape \(8, 3, 32, 32\) is not a batch of images.*channels-first"):
        fit(tiny_config(), chw, tmp_path / "bad")  # all 8 images: the held-out split comes later
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("reconstructor", ["no-attention", "no-query", "cnn"])
def test_ablation_runs_load_from_their_folder(tiny_category, tmp_path, reconstructor):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    cfg = with_overrides(tiny_config(epochs=1), "model", reconstructor=reconstructor)
    fit(cfg, samples, tmp_path / "run")
    det = Detector.load(tmp_path / "run")
    assert det.config.model.reconstructor == reconstructor and det.network.model.reconstructor == reconstructor


def test_pixel_target_run(tiny_category, tmp_path):
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    fit(with_overrides(tiny_config(epochs=1), "model", target="pixels"), samples, tmp_path / "run")
    det = Detector.load(tmp_path / "run")
    assert det.network.backbone.out_channels == 3 * 16 * 16
    assert det.predict(samples[0].image).anomaly_map.shape == (64, 64)


def loss_and_gradient(model: torch.nn.Module, forward, feats: torch.Tensor,
                      precision: str) -> tuple[float, torch.Tensor]:
    """One training step's loss and the model's whole gradient as one vector (``forward``: the
    model itself or a compiled graph of it)."""
    from adtr.models.adtr import reconstruction_loss

    model.zero_grad(set_to_none=True)
    with autocast(precision, torch.device("cpu")):
        loss = reconstruction_loss(forward(feats))
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_bf16_training_step_matches_fp32():
    """The training fast path (bf16 autocast, default on AMX CPUs and GPUs) against fp32:
    same loss to 2% and gradients pointing the same way (cosine > 0.99) at the paper's sizes."""
    from adtr.models.adtr import ADTR

    torch.manual_seed(0)
    model = ADTR(64, 16, dropout=0.0)
    feats = torch.randn(4, 64, 16, 16) * 3 + 1
    model.set_feature_stats(feats)
    ref_loss, ref_grad = loss_and_gradient(model, model, feats, "fp32")
    loss, grad = loss_and_gradient(model, model, feats, "bf16")
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(ref_grad, grad, dim=0) > 0.99
    assert loss != ref_loss  # bf16 really ran


def test_runs_saved_with_the_blocks_past_the_last_stage_still_load(tiny_category, tmp_path):
    """Checkpoints written before the backbone dropped its unused blocks hold their weights too."""
    import timm

    config = with_overrides(tiny_config(epochs=1), "model", stages=(1, 2, 3))
    fit(config, index_mvtec(tiny_category.parent, tiny_category.name, "train"), tmp_path / "run")
    ckpt = ckpt_io.load_checkpoint(tmp_path / "run" / "model.pt")
    assert not any(k.startswith("blocks.6.") for k in ckpt["backbone"])  # stage 3 ends after blocks.4
    whole = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True).state_dict()
    old = {**whole, **ckpt["backbone"]}
    _, backbone, _ = restore_networks({**ckpt, "backbone": old}, tmp_path / "run" / "model.pt")
    assert all(torch.equal(v, ckpt["backbone"][k]) for k, v in backbone.body.state_dict().items())
    missing = {k: v for k, v in ckpt["backbone"].items() if not k.startswith("blocks.4.")}
    with pytest.raises(AdtrError, match="weights do not fit"):
        restore_networks({**ckpt, "backbone": missing}, tmp_path / "run" / "model.pt")


def test_compiled_training_takes_the_eager_steps(tiny_category, tmp_path, caplog):
    """``--compile``: the same losses and weights as eager training, within float tolerance
    (jitter off: Inductor draws its own random numbers); the ragged last batch runs eagerly.

    In fp32 on every machine: ``--precision auto`` picks bf16 where it is fast (AMX), and there
    the compiled and eager steps round differently, about 2% apart in some weights after two
    epochs, with either optimiser."""
    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    # A one-layer model: compilation time grows with the graph, and the mechanics are the same.
    no_jitter = with_overrides(tiny_config(epochs=2, precision="fp32"), "model", jitter=0.0, dim=64, num_heads=4,
                               ffn_dim=128, num_encoder_layers=1, num_decoder_layers=1)
    eager = fit(no_jitter, samples, tmp_path / "eager")
    with caplog.at_level("INFO", logger="adtr.engine"):
        compiled = fit(with_overrides(no_jitter, "train", compile=True), samples, tmp_path / "compiled")
    assert "compiled the training step" in caplog.text and "torch.compile failed" not in caplog.text
    for a, b in zip(eager.history, compiled.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    a = ckpt_io.load_checkpoint(tmp_path / "eager" / "model.pt")["model"]
    b = ckpt_io.load_checkpoint(tmp_path / "compiled" / "model.pt")["model"]
    # Every weight within 0.1% of eager, except the key biases: a key bias adds the same logit to
    # every key of a query, so its true gradient is zero and Adam turns float noise into lr-sized steps.
    for k in a:
        if a[k].is_floating_point() and not k.endswith("k_proj.bias"):
            assert float((a[k] - b[k]).norm()) <= 1e-3 * float(a[k].norm()) + 1e-6, k
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the compiled kernels really ran


def test_compiled_bf16_training_step_matches_eager_fp32():
    """The fastest training path on an AMX CPU or a GPU (``--compile`` with bf16 autocast)
    against the fp32 reference, with the tolerance of the eager bf16 step: the same loss to 2%
    and gradients pointing the same way (cosine > 0.99)."""
    from adtr.engine import TrainingForward
    from adtr.models.adtr import ADTR

    torch.manual_seed(0)
    # One layer each, as in the compiled-fit test above: compilation time grows with the graph.
    model = ADTR(64, 16, dim=64, num_heads=4, ffn_dim=128, num_encoder_layers=1, num_decoder_layers=1,
                 dropout=0.0, pos_init="normal").train()
    feats = torch.randn(4, 64, 16, 16) * 3 + 1
    model.set_feature_stats(feats)
    ref_loss, ref_grad = loss_and_gradient(model, model, feats, "fp32")
    compiled = TrainingForward(model, batch_size=len(feats))
    compiled.prepare(feats, "bf16", torch.device("cpu"))
    assert compiled.graph is not None, "torch.compile failed on this machine"
    loss, grad = loss_and_gradient(model, compiled, feats, "bf16")
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(ref_grad, grad, dim=0) > 0.99
    assert loss != ref_loss  # bf16 really ran


def test_training_forward_runs_the_graph_on_full_batches_only():
    from adtr.engine import TrainingForward

    calls = []
    forward = TrainingForward(lambda x: ("eager", len(x)), batch_size=4)
    forward.graph = lambda x: calls.append(len(x)) or ("graph", len(x))
    assert forward(torch.zeros(4, 1)) == ("graph", 4)
    assert forward(torch.zeros(3, 1)) == ("eager", 3)
    assert calls == [4]


def test_failed_compilation_trains_eagerly_with_the_same_random_numbers(tiny_category, tmp_path, monkeypatch,
                                                                          caplog):
    """No C++ compiler (or Triton): a warning, then the eager fit bit for bit, although the failed
    attempt drew random numbers (the random state is restored: jitter and resume stay exact)."""
    import adtr.engine

    def broken_compile(model, **kwargs):
        def graph(x):
            torch.randn(100)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\ndetails")
        return graph

    samples = index_mvtec(tiny_category.parent, tiny_category.name, "train")
    fit(tiny_config(epochs=2), samples, tmp_path / "eager")
    monkeypatch.setattr(adtr.engine.torch, "compile", broken_compile)
    with caplog.at_level("WARNING", logger="adtr.engine"):
        fit(tiny_config(epochs=2, compile=True), samples, tmp_path / "fallback")
    assert ("torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found); it needs a "
            "C++ compiler on the CPU and Triton on a GPU; training without it") in caplog.text
    a = ckpt_io.load_checkpoint(tmp_path / "eager" / "model.pt")["model"]
    b = ckpt_io.load_checkpoint(tmp_path / "fallback" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
