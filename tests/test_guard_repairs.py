"""The guard's repair ladder for static_int8 (worker/engine/quantize/guard.py): when no calibration
keeps the promise, 16-bit joins and outputs and then equalization + AdaRound + bias correction are
tried before any layer is handed back to float, and a budget stops the search. On the unbalanced depthwise-separable model of
test_equalize.py, trained on digits, with per-tensor weights (measured on AMD EPYC, avx2 +
avx512_vnni): top-1 agreement with the float model 0.08 (minmax), 0.08 (percentile) and 0.10
(entropy), 0.92 once repaired; a promise of 0.8 leaves room for another CPU's int8 kernels."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from modelpress.spec.configs import parse_step
from tests.test_equalize import outputs, unbalanced_model
from worker.engine.data import ImageSet
from worker.engine.errors import GuardNotMet
from worker.engine.registry import StepContext, handler_for
from worker.recipe import decided_steps


# These tests are about the weight repairs: the per-tensor precision rung, which comes before them,
# would keep this model's broken per-tensor weights float instead (tests/test_precision_rung.py).
WEIGHT_REPAIRS_ONLY = {"precision_repair": False}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    images = load_digits().images.astype(np.float32)[:, None] / 16.0
    path = unbalanced_model(tmp_path_factory.mktemp("repairs") / "m.onnx", train=True)
    return path, {"calibration": ImageSet(images[:256], None), "eval": ImageSet(images[256:1056], None)}


def run(path, data, workdir, guard):
    params = {"method": "static_int8", "per_channel": False, "activation_type": "uint8", "guard": guard, **WEIGHT_REPAIRS_ONLY}
    config = parse_step("quantize", params)
    workdir.mkdir()
    return params, handler_for(config)(config, StepContext(path, path, workdir, data, lambda s, f: None))


def test_the_repairs_keep_the_promise_before_any_layer_goes_float(tmp_path, setting):
    path, data = setting
    params, result = run(path, data, tmp_path / "guarded", {"min_top1_agreement": 0.8})
    guard = result.metrics["guard"]
    attempts = [a["attempt"] for a in guard["attempts"]]
    assert attempts[:3] == ["calibration minmax", "calibration percentile", "calibration entropy"]
    assert not any(a["meets_on_tune"] for a in guard["attempts"][:3]), guard["attempts"]
    assert max(a["tune"]["top1_agreement"] for a in guard["attempts"][:3]) < 0.5  # broken, not nearly there
    # The ladder goes by cost: 16-bit joins and outputs first (one more quantization), which cannot
    # mend per-tensor weights, then the weight repairs, which do.
    assert attempts[3] == "16-bit joins and outputs" and not guard["attempts"][3]["meets_on_tune"]
    assert attempts[4] == "equalize, AdaRound, bias correction" and guard["attempts"][4]["meets_on_tune"]
    assert guard["met"] and guard["kept_float"] == []
    weight_repairs = {"equalize": True, "adaround": True, "bias_correction": "sequential"}
    # Each repair starts from the best candidate so far: the 16-bit tensors stay only if they helped.
    helped = guard["attempts"][3]["tune"]["top1_agreement"] > max(a["tune"]["top1_agreement"] for a in guard["attempts"][:3])
    assert guard["repairs"] == ({**weight_repairs, "wide_activations": guard["repairs"].get("wide_activations")} if helped else weight_repairs)
    assert result.metrics["adaround"]["layers"] == 4 and result.metrics["equalization"]["pairs"] == 2
    # The recipe asks for the repairs at once.
    [step], decisions = decided_steps([{"type": "quantize", "params": params}], [result.metrics])
    assert step["params"]["equalize"] is True and step["params"]["bias_correction"] == "sequential"
    assert {"equalize", "adaround", "bias_correction"} <= {d["param"] for d in decisions}


def test_a_used_up_budget_stops_the_search_with_the_best_candidate(tmp_path, setting):
    path, data = setting
    with pytest.raises(GuardNotMet) as failure:
        run(path, data, tmp_path / "budget", {"min_top1_agreement": 0.8, "budget_s": 0.001})
    guard = failure.value.result.metrics["guard"]
    tried = [a for a in guard["attempts"] if "skipped" not in a]
    skipped = [a for a in guard["attempts"] if "skipped" in a]
    assert len(tried) == 1 and skipped and all("budget" in a["skipped"] for a in skipped)
    assert guard["met"] is False


def run_unguarded(path, data, workdir, floor, **params):
    params = {"method": "static_int8", "per_channel": False, "activation_type": "uint8", **WEIGHT_REPAIRS_ONLY, **params}
    config = parse_step("quantize", params)
    workdir.mkdir()
    return handler_for(config)(config, StepContext(path, path, workdir, data, lambda s, f: None, floor=floor))


def test_without_a_guard_a_result_below_the_floor_repairs_itself(tmp_path, setting):
    path, data = setting
    images = data["eval"].images
    reference = outputs(path, images).argmax(1)
    # A bound of 0.8: the repaired model keeps 0.92 of the float model's predictions, as asked 0.08.
    result = run_unguarded(path, data, tmp_path / "floor", {"top1_agreement": 0.8})
    repair = result.metrics["repair"]
    assert repair["needed"] and repair["met"], repair["attempts"]
    assert [m["metric"] for m in repair["trigger"]] == ["top1_agreement"] and repair["trigger"][0]["value"] < 0.5
    assert repair["repairs"]["equalize"] is True and repair["kept_float"] == []
    agreement = float(np.mean(outputs(result.model_path, images).argmax(1) == reference))  # independent, on all 800
    assert agreement >= 0.8, agreement
    # With the floor off, or with repair off, the model is the one asked for: broken, and not searched.
    for name, kwargs in (("off", {"floor": "off"}), ("no-repair", {"floor": {"top1_agreement": 0.8}, "repair": False})):
        plain = run_unguarded(path, data, tmp_path / name, **kwargs)
        assert "repair" not in plain.metrics
        assert float(np.mean(outputs(plain.model_path, images).argmax(1) == reference)) < 0.5


def test_a_result_that_meets_the_floor_is_kept_as_asked(tmp_path, setting):
    path, data = setting
    result = run_unguarded(path, data, tmp_path / "low", {"top1_agreement": 0.01})
    assert result.metrics["repair"]["needed"] is False and len(result.metrics["repair"]["attempts"]) == 1
    assert result.model_path.parent == tmp_path / "low"  # built once, in the step's own folder
