"""A job's inputs: its model as ONNX, its datasets by role, and other models it refers to."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelpress.spec.errors import EngineError, NotFound
from service.jobs import runner_api
from service.jobs.runner_api import ClaimedJob, StoredModel
from worker.engine.data import ImageSet, load_dataset, split
from worker.engine import evaluate
from worker.engine.formats import to_onnx
from worker.engine.preflight import MAX_SAMPLES, preflight, preflight_summary

LOAD_SHARE = 0.05  # of the job's progress bar


@dataclass
class JobInputs:
    model: StoredModel
    original: Path  # the job's model as ONNX
    data: dict[str, ImageSet]  # by role: calibration, train, eval
    eval_data: ImageSet | None
    load_model: Callable[[str], Path]  # another model of the tenant, by id, as ONNX


def runnable(path: Path) -> Path:
    """The model, once ONNX Runtime has loaded it: a model it cannot run (a custom-domain op, a
    kernel it lacks) fails the job here as `model_not_runnable`, before a technique trips on it."""
    evaluate.open_session(path, 1)
    return path


def load_inputs(job: ClaimedJob, deps, progress, work: Path) -> JobInputs:
    store, tenant_id = deps.store, job.tenant_id
    progress("load", 0.0, force=True)
    data_spec = job.spec["data"]
    split_spec = data_spec.get("split")
    wanted = {role: ds_id for role, ds_id in data_spec.items() if role != "split" and ds_id}
    if split_spec:
        wanted["split"] = split_spec["dataset"]
    try:
        model = runner_api.model(sessions=deps.session_factory, tenant_id=tenant_id, model_id=job.model_id)
        dataset_rows = runner_api.datasets(sessions=deps.session_factory, tenant_id=tenant_id, dataset_ids=wanted)
    except NotFound as exc:
        raise EngineError(exc.code, exc.message) from exc
    if len(model.inputs) > 1:
        raise EngineError("unsupported_model_input", "models with more than one input are not supported yet")
    input_shape = model.inputs[0]["shape"] if model.inputs else None
    input_name = model.inputs[0]["name"] if model.inputs else "input"

    original_file = store.get_file(model.storage_key, work / Path(model.storage_key).name)
    data: dict[str, ImageSet] = {}
    for role, row in dataset_rows.items():
        local = store.get_file(row.storage_key, work / f"{role}-{Path(row.storage_key).name}")
        data[role] = load_dataset(local, dataset_format=row.format, layout=row.layout, preprocess=row.preprocess,
                                  model_shape=input_shape, role=role, input_name=input_name, channels_hint=row.shape[1])
        progress("load", LOAD_SHARE * 0.5 * len(data) / len(dataset_rows))
    if split_spec:
        rest, held_out = split(data.pop("split"), eval_fraction=split_spec["eval_fraction"], seed=split_spec["seed"])
        data.setdefault("eval", held_out)
        data.setdefault("calibration", rest)
        data.setdefault("train", rest)
    eval_data = data.get("eval") or data.get("calibration") or data.get("train")
    example = eval_data.images if eval_data is not None else None
    original = runnable(to_onnx(original_file, model.format, work, example, packed=(model.details or {}).get("packaging") == "zip"))
    progress("load", LOAD_SHARE)

    def load_model(model_id: str) -> Path:
        try:
            row = runner_api.model(sessions=deps.session_factory, tenant_id=tenant_id, model_id=model_id)
        except NotFound as exc:
            raise EngineError(exc.code, exc.message) from exc
        folder = work / f"model-{model_id}"
        folder.mkdir(exist_ok=True)
        local = store.get_file(row.storage_key, folder / Path(row.storage_key).name)
        return runnable(to_onnx(local, row.format, folder, example, packed=(row.details or {}).get("packaging") == "zip"))

    return JobInputs(model, original, data, eval_data, load_model)


def run_preflight(inputs: JobInputs, progress) -> dict:
    """The model's graph read once before the first step (worker/engine/preflight.py): findings
    for metrics["preflight"]; its own failures are recorded there, never the job's."""
    sample = inputs.eval_data.images[:MAX_SAMPLES] if inputs.eval_data is not None else None
    checks = preflight(inputs.original, sample)
    progress.log(f"preflight: {preflight_summary(checks)}")
    return checks
