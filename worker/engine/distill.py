"""The `distill` step: a student learns to reproduce a teacher.

Teacher: `teacher_model_id`, or the job's original model. Student: `student_model_id`, or a
structurally pruned copy of the teacher (`from_teacher.prune_channels`), or the previous step's
output (the job's model when distill comes first). Both are ONNX here, whatever was uploaded; the
student becomes a trainable torch module, the teacher only runs forward. The loss and the loop are
training.fit's; this file only picks the two models, checks they fit each other, and reports.
"""

import numpy as np
import onnx

from worker.engine import train_norm
from modelpress.spec.configs import DistillConfig
from worker.engine.device import pick_device
from modelpress.spec.errors import EngineError
from worker.engine.evaluate import open_session, quality, run_outputs
from worker.engine.graph_stats import graph_stats
from worker.engine.prune import channel_graph, importance
from modelpress.spec.quantized import is_quantized
from worker.engine.registry import StepContext, StepResult, register
from worker.engine.training import TrainSpec, fit, trainable, write_back


@register(DistillConfig)
def distill(config: DistillConfig, ctx: StepContext) -> StepResult:
    teacher = ctx.load_model(config.teacher_model_id) if config.teacher_model_id else ctx.original_path
    train, eval_data = ctx.data["train"], ctx.data.get("eval")
    targets = None  # a pruned copy starts each channel from its statistics in the teacher (train_norm.attach)
    if config.student_model_id:
        student_path, student_from = ctx.load_model(config.student_model_id), f"model {config.student_model_id}"
    elif config.from_teacher:
        student_path = ctx.workdir / "student.onnx"
        kept = _pruned_copy(teacher, student_path, config.from_teacher.prune_channels, config.from_teacher.round_to)
        student_from = f"the teacher with {config.from_teacher.prune_channels:.0%} of its channels pruned"
        targets = {name: (mean[kept[name]], std[kept[name]]) if name in kept else (mean, std)
                   for name, (mean, std) in train_norm.output_statistics(teacher, train.images, pick_device()).items()}
    else:
        student_path, student_from = ctx.model_path, "the previous step's output"
        targets = train_norm.load_targets(ctx.model_path)  # a prune step before may have left them
    if is_quantized(onnx.load(str(student_path), load_external_data=False)):
        raise EngineError("model_already_quantized", "the student must be a float model: put distill before quantize")
    _check_outputs_match(teacher, student_path, train.images[:2])

    reference = run_outputs(open_session(teacher, 1), eval_data.head(2000).images) if eval_data is not None else None
    before = quality(student_path, eval_data, reference)
    spec = TrainSpec.of(config, augment=list(config.augment), patience=config.patience, seed=config.seed,
                        temperature=config.temperature, alpha=config.alpha,
                        feature_pairs=[tuple(p) for p in config.feature_pairs], feature_weight=config.feature_weight)
    student, norms, trainable_path = trainable(student_path, train, pick_device(), ctx.workdir, targets)
    training = fit(student, train, spec, progress=ctx.progress, device=pick_device(), teacher_path=teacher,
                   eval_data=eval_data, checkpoints=ctx.checkpoints)
    output = ctx.workdir / "distilled.onnx"
    write_back(student, norms, trainable_path, output)
    return StepResult(output, {
        "student": student_from, "teacher": config.teacher_model_id or "the job's original model",
        "student_parameters": graph_stats(student_path)["parameters"], "teacher_parameters": graph_stats(teacher)["parameters"],
        "temperature": config.temperature, "alpha": config.alpha, "label_free": config.alpha == 0,
        "quality": {"teacher": quality(teacher, eval_data, reference), "student_before": before,
                    "student_after": quality(output, eval_data, reference)},
        "training": training,
    })


def _pruned_copy(teacher, output, ratio: float, round_to: int) -> dict[str, np.ndarray]:
    """Write the pruned copy; return, per convolution, the teacher channels it kept."""
    model = onnx.load(str(teacher))
    graph = channel_graph.analyse(model)
    if not graph.prunable():
        raise EngineError("nothing_to_prune", "from_teacher: no channel group of the teacher can be pruned safely")
    kept = channel_graph.choose(importance.by_name("l2").scores(graph), channel_graph.keep_counts(graph, ratio, round_to))
    onnx.save(channel_graph.apply(graph, kept), str(output))
    return channel_graph.kept_outputs(graph, kept)


def _check_outputs_match(teacher, student, sample: np.ndarray) -> None:
    shapes = [[o.shape[1:] for o in run_outputs(open_session(path, 1), sample)] for path in (teacher, student)]
    if shapes[0][:1] != shapes[1][:1]:
        raise EngineError("student_output_mismatch", f"the student's output shape {shapes[1][0]} differs from the teacher's {shapes[0][0]}")
