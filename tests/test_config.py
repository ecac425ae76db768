"""Training options are checked where they are made, so a bad value is one clear error."""

from __future__ import annotations

import pytest

from adtr.cli import build_parser, config_from_args, main
from adtr.config import PLUS_TRAIN_DEFAULTS, RunConfig, TrainConfig, from_dict, to_dict, with_overrides
from adtr.errors import AdtrError


@pytest.mark.parametrize("field, value, flag", [
    ("epochs", 0, "--epochs"), ("batch_size", 0, "--batch-size"), ("lr", 0.0, "--lr"),
    ("weight_decay", -1e-4, "--weight-decay"), ("step_at", 0.0, "--step-at"), ("step_at", 1.5, "--step-at"),
    ("warmup_fraction", 1.0, "--warmup-fraction"), ("warmup_fraction", -0.1, "--warmup-fraction"),
    ("grad_clip", -1.0, "--grad-clip"), ("val_fraction", 1.0, "--val-fraction"), ("patience", -1, "--patience"),
    ("max_minutes", -5.0, "--max-minutes"), ("checkpoint_seconds", -1.0, "--checkpoint-every"),
    ("schedule", "cosine", "--schedule"), ("optimizer", "sgd", "--optimizer"), ("muon_rms", 0.0, "--muon-rms"),
    ("precision", "fp16", "--precision"), ("select", "best", "--select"), ("feature_cache", "ram", "--feature-cache"),
])
def test_an_impossible_training_value_names_its_field_and_flag(field, value, flag):
    with pytest.raises(AdtrError, match=rf"train\.{field} \({flag}\) must be .*got {value}"):
        with_overrides(RunConfig(), "train", **{field: value})


@pytest.mark.parametrize("field, value, flag", [
    ("sigma", -1.0, "--sigma"), ("pool_size", 0, "--pool-size"), ("target_fpr", 1.0, "--target-fpr"),
    ("target_fpr", -0.01, "--target-fpr"), ("threshold_rule", "median", "--threshold-rule"),
])
def test_an_impossible_scoring_value_names_its_field_and_flag(field, value, flag):
    """Refused when the config is made, not after training, at calibration."""
    with pytest.raises(AdtrError, match=rf"score\.{field} \({flag}\) must be .*got {value}"):
        with_overrides(RunConfig(), "score", **{field: value})


@pytest.mark.parametrize("field, value, named", [
    ("grid_stride", 0, r"model\.grid_stride \(--grid-stride\)"),
    ("grid_stride", -16, r"model\.grid_stride \(--grid-stride\)"),
    ("image_size", 0, r"model\.image_size \(--image-size\)"), ("stages", (), r"model\.stages \(--stages\)"),
    ("dropout", 1.0, r"model\.dropout \(--dropout\)"),
    ("cells_per_token", 0, r"model\.cells_per_token \(--cells-per-token\)"),
    ("dim", 0, r"model\.dim"), ("num_heads", 0, r"model\.num_heads"), ("ffn_dim", 0, r"model\.ffn_dim"),
    ("num_encoder_layers", 0, r"model\.num_encoder_layers"), ("num_decoder_layers", 0, r"model\.num_decoder_layers"),
    ("error_space", "standardised", r"model\.error_space \(--error-space\)"),
    ("reconstructor", "mlp", r"model\.reconstructor \(--reconstructor\)"),
    ("target", "patches", r"model\.target \(--target\)"), ("pos_init", "zeros", r"model\.pos_init \(--pos-init\)"),
    ("cross_init", "same", r"model\.cross_init \(--cross-init\)"),
    ("neighbour_mask", -3, r"model\.neighbour_mask \(--neighbour-mask\)"),
    ("jitter", -1.0, r"model\.jitter \(--jitter\)"),
])
def test_an_impossible_model_size_names_its_field(field, value, named):
    """A zero stride used to divide by zero inside the backbone, a zero width inside torch; a
    misspelt choice (``standardised``) trained on as if it were the default, or failed late."""
    with pytest.raises(AdtrError, match=rf"^{named} must be .*got {value}"):
        with_overrides(RunConfig(), "model", **{field: value})


def test_threshold_rule_from_the_cli():
    parser = build_parser()
    args = parser.parse_args(["fit", "good", "--out", "r", "--threshold-rule", "conformal", "--target-fpr", "0.05"])
    assert config_from_args(args).score.threshold_rule == "conformal"
    assert config_from_args(args).score.target_fpr == 0.05
    assert config_from_args(parser.parse_args(["fit", "good", "--out", "r"])).score.threshold_rule == "quantile"
    saved = to_dict(RunConfig())
    del saved["score"]["threshold_rule"]  # a run saved before the option
    assert from_dict(saved).score.threshold_rule == "quantile"


def test_the_defaults_and_the_plus_defaults_pass_and_survive_a_round_trip():
    config = with_overrides(RunConfig(), "train", **PLUS_TRAIN_DEFAULTS)
    assert from_dict(to_dict(config)) == config
    TrainConfig(warmup_fraction=0.0, val_fraction=0.0, step_at=1.0, max_minutes=0.0)


def test_a_run_saved_before_the_optimizer_option_resumes_with_adamw():
    """Its last.pt holds AdamW's state, whatever today's default optimiser is."""
    saved = to_dict(RunConfig())
    del saved["train"]["optimizer"]
    assert from_dict(saved).train.optimizer == "adamw"
    del saved["train"]["muon_rms"]
    muon = {**saved, "train": {**saved["train"], "optimizer": "muon"}}
    assert from_dict(muon).train.muon_rms == 0.2  # Muon runs saved before --muon-rms: AdamW's size
    assert from_dict({"model": saved["model"]}).train == TrainConfig()  # no train section: today's defaults


def test_optimizer_from_the_cli():
    parser = build_parser()
    assert config_from_args(parser.parse_args(["fit", "good", "--out", "r", "--optimizer", "muon"])).train.optimizer \
        == "muon"
    assert config_from_args(parser.parse_args(["fit", "good", "--out", "r"])).train.optimizer == TrainConfig().optimizer
    assert config_from_args(parser.parse_args(["fit", "good", "--out", "r", "--muon-rms", "0.4"])).train.muon_rms \
        == 0.4


def test_warmup_fraction_and_schedule_from_the_cli():
    parser = build_parser()
    args = parser.parse_args(["fit", "good", "--out", "r", "--warmup-fraction", "0.2",
                              "--schedule", "warmup-stable-decay"])
    assert config_from_args(args).train.warmup_fraction == 0.2
    assert config_from_args(args).train.schedule == "warmup-stable-decay"
    assert config_from_args(parser.parse_args(["fit", "good", "--out", "r"])).train.warmup_fraction == 0.05


def test_fit_refuses_a_bad_value_before_reading_images(tmp_path, capsys):
    missing = tmp_path / "nowhere"  # never read: the option is refused first
    code = main(["fit", str(missing), "--out", str(tmp_path / "run"), "--batch-size", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: train.batch_size (--batch-size) must be at least 1, got 0"
    assert not (tmp_path / "run").exists()
