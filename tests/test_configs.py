"""Step configs: one class per scheme behind the same JSON, versioned dicts, presets as data."""

import pytest

from modelpress.spec.configs import (
    ChannelPruneConfig, CodebookConfig, DistillConfig, DynamicInt8Config, Fp16Config, MagnitudePruneConfig,
    NMPruneConfig, QatConfig, StaticInt8Config, WeightOnlyConfig, parse_step)
from modelpress.spec.errors import EngineError
from modelpress.spec.presets import PRESETS

# The dumps version 1 recorded in jobs (one flat class per step type, every field filled in).
V1_QUANTIZE_DUMP = {
    "version": 1, "method": "static_int8", "bits": 8, "per_channel": True, "symmetric": True, "calibration": "minmax",
    "percentile": 99.999, "activation_type": "auto", "weight_type": "int8", "calibration_samples": 256,
    "block_size": None, "keep_io_types": True, "exclude": [], "keep_first_last": False, "guard": None,
    "epochs": 1, "lr": 1e-4, "batch_size": 64, "distill": False, "seed": 0,
}
V1_PRUNE_DUMP = {
    "version": 1, "method": "n_m", "sparsity": 0.5, "scope": "layer", "min_weights": 1024, "n": 2, "m": 4, "ratio": None,
    "target_macs": None, "target_params": None, "importance": "l2", "round_to": 8, "exclude": [], "finetune": None,
    "iterations": 1, "seed": 0,
}


@pytest.mark.parametrize(("step_type", "params", "scheme"), [
    ("quantize", {}, StaticInt8Config),
    ("quantize", {"method": "dynamic_int8", "calibration": "entropy"}, DynamicInt8Config),
    ("quantize", {"method": "fp16", "bits": 16, "per_channel": False}, Fp16Config),
    ("quantize", {"method": "weight_only", "bits": 4, "block_size": 32}, WeightOnlyConfig),
    ("quantize", {"method": "codebook", "epochs": 3}, CodebookConfig),
    ("quantize", {"method": "qat", "epochs": 2, "calibration": "mse"}, QatConfig),
    ("quantize", {**V1_QUANTIZE_DUMP, "method": "fp16", "bits": None}, Fp16Config),
    ("prune", {}, ChannelPruneConfig),
    ("prune", {"method": "magnitude", "n": 3, "importance": "taylor"}, MagnitudePruneConfig),
    ("prune", V1_PRUNE_DUMP, NMPruneConfig),
    ("distill", {"version": 1, "epochs": 2}, DistillConfig),
])
def test_version_1_bodies_parse_into_one_class_per_scheme(step_type, params, scheme):
    config = parse_step(step_type, params)
    assert type(config) is scheme
    dumped = config.model_dump()
    assert dumped["version"] == 2
    # A recorded dump parses back to the same config (the runner re-reads what the API recorded).
    assert parse_step(step_type, dumped) == config


def test_upgrade_keeps_what_the_scheme_uses():
    config = parse_step("quantize", V1_QUANTIZE_DUMP)
    assert config == StaticInt8Config()
    assert parse_step("quantize", {"method": "weight_only", "bits": 4}).keep_first_last is True
    assert parse_step("quantize", {"method": "codebook", "bits": 8}).keep_first_last is False
    assert parse_step("prune", {"method": "channels", "target_macs": 0.5}).ratio is None
    assert parse_step("prune", {}).ratio == 0.3


@pytest.mark.parametrize(("step_type", "params", "code"), [
    ("quantize", {"method": "fp16", "bits": 8}, "invalid_step_params"),
    ("quantize", {"method": "static_int8", "block_size": 32}, "invalid_step_params"),
    ("quantize", {"method": "static_int8", "bits": 4}, "invalid_step_params"),
    ("quantize", {"colour": 1}, "invalid_step_params"),
    # Version 2 is strict: a field the scheme does not take is an error.
    ("quantize", {"version": 2, "method": "dynamic_int8", "calibration": "entropy"}, "invalid_step_params"),
    ("prune", {"method": "magnitude", "ratio": 0.5}, "invalid_step_params"),
    ("prune", {"method": "n_m", "iterations": 2}, "invalid_step_params"),
    ("prune", {"method": "channels", "ratio": 0.3, "target_macs": 0.5}, "invalid_step_params"),
    ("quantize", {"version": 3}, "unsupported_config_version"),
    ("quantize", {"version": "2"}, "unsupported_config_version"),
    ("distill", {"version": 0}, "unsupported_config_version"),
    ("sharpen", {}, "unknown_step_type"),
])
def test_bad_params_name_their_problem(step_type, params, code):
    with pytest.raises(EngineError) as raised:
        parse_step(step_type, params)
    assert raised.value.code == code


def test_qat_exports_through_the_static_int8_config():
    export = QatConfig(calibration="entropy", per_channel=False, exclude=["Gemm"]).export_config()
    assert export == StaticInt8Config(calibration="minmax", activation_type="uint8", per_channel=False, exclude=["Gemm"])


def test_presets_are_data_that_parse():
    for preset in PRESETS.values():
        for labelled in (True, False):
            configs = [parse_step(step["type"], step["params"]) for step in preset.steps(labelled)]
            distills = [c for c in configs if isinstance(c, DistillConfig)]
            assert all(c.alpha == (0.5 if labelled else 0.0) for c in distills)
