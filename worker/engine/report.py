"""report.html: a self-contained page (inline CSS and SVG, no scripts, no external resources) with
the before/after table and charts, readable without the service."""

from html import escape

from worker.engine.report_examples import STYLE as EXAMPLES_STYLE, section as task_section

BEFORE, AFTER = "#8a94a6", "#2f6fde"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,d}"
    return escape(str(value))


def _bars(title: str, unit: str, before: float | None, after: float | None, better: str) -> str:
    """Two horizontal bars (original, compressed) scaled to the larger value."""
    if before is None or after is None:
        return ""
    top = max(before, after) or 1.0
    rows = []
    for index, (label, value, colour) in enumerate((("original", before, BEFORE), ("compressed", after, AFTER))):
        width = max(1.0, 300.0 * value / top)
        y = 8 + index * 30
        rows.append(f'<text x="0" y="{y + 15}" class="label">{label}</text>'
                    f'<rect x="90" y="{y}" width="{width:.1f}" height="20" fill="{colour}"/>'
                    f'<text x="{95 + width:.1f}" y="{y + 15}" class="value">{_fmt(value)} {escape(unit)}</text>')
    return (f'<figure><figcaption>{escape(title)} <small>({escape(better)} is better)</small></figcaption>'
            f'<svg role="img" aria-label="{escape(title)}" width="520" height="70" xmlns="http://www.w3.org/2000/svg">'
            + "".join(rows) + "</svg></figure>")


def _row(name: str, before, after, change: str = "") -> str:
    return f"<tr><th>{escape(name)}</th><td>{_fmt(before)}</td><td>{_fmt(after)}</td><td>{escape(change)}</td></tr>"


def _latency(section: dict, key: str) -> float | None:
    entry = (section.get("latency") or {}).get(key)
    return entry["p50_ms"] if entry else None


def render(metrics: dict, *, job_id: str = "", pictures: dict[str, bytes] | None = None) -> str:
    """`pictures`: the PNG bytes of metrics.examples' images by their `file`, embedded as data URIs."""
    before, after = metrics.get("original", {}), metrics.get("compressed", {})
    comparison = metrics.get("comparison", {})
    acc_before = (before.get("accuracy") or {}).get("top1")
    acc_after = (after.get("accuracy") or {}).get("top1")

    table = [
        _row("size (bytes)", before.get("size_bytes"), after.get("size_bytes"), f"{comparison.get('size_ratio', 0):.2f}x smaller"),
        _row("parameters", before.get("parameters"), after.get("parameters")),
        _row("non-zero parameters", before.get("nonzero_parameters"), after.get("nonzero_parameters")),
        _row("MACs (batch 1)", before.get("macs"), after.get("macs")),
    ]
    for key in ("batch_1", "batch_32"):
        speedup = comparison.get(f"speedup_{key}")
        change = "" if speedup is None else (f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x SLOWER")
        table.append(_row(f"latency p50, {key.replace('_', ' ')} (ms)", _latency(before, key), _latency(after, key), change))
    if acc_before is not None:
        drop_row = _row("top-1 accuracy", acc_before, acc_after, f"drop {100 * comparison.get('accuracy_drop', 0):.2f} points")
        large = any(w["code"] == "large_accuracy_drop" for w in metrics.get("warnings", []))
        table.append(drop_row.replace("<tr>", '<tr class="warn">', 1) if large else drop_row)
        table.append(_row("top-5 accuracy", before["accuracy"].get("top5"), after["accuracy"].get("top5")))

    fidelity_rows = "".join(
        f"<tr><td>{_fmt(f.get('output'))}</td><td>{_fmt(f.get('top1_agreement'), 4)}</td><td>{_fmt(f.get('cosine_mean'), 5)}</td>"
        f"<td>{_fmt(f.get('max_abs_error'), 4)}</td><td>{_fmt(f.get('kl_softmax'), 6)}</td>"
        f"<td>{_worst(f.get('worst_slice'))}</td></tr>"
        for f in comparison.get("fidelity", []))
    layers = metrics.get("layers") or []
    layer_rows = "".join(
        f"<tr><td>{escape(layer['layer'])}</td><td>{escape(layer['op'])}</td><td>{_fmt(layer['sqnr_db'], 2)}</td></tr>"
        for layer in sorted(layers, key=lambda item: item["sqnr_db"] if item["sqnr_db"] is not None else 1e9))
    steps = "".join(f"<li><code>{escape(step['type'])}</code> {escape(_step_summary(step))}</li>" for step in metrics.get("steps", []))
    environment = metrics.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in (environment.get("versions") or {}).items() if v)

    charts = "".join([
        _bars("Size", "bytes", before.get("size_bytes"), after.get("size_bytes"), "smaller"),
        _bars("Latency p50, batch 1", "ms", _latency(before, "batch_1"), _latency(after, "batch_1"), "smaller"),
        _bars("Latency p50, batch 32", "ms", _latency(before, "batch_32"), _latency(after, "batch_32"), "smaller"),
        _bars("Top-1 accuracy", "", acc_before, acc_after, "larger"),
    ])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>modelpress report {escape(job_id)}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #1d2330; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} th, td {{ padding: .3rem .8rem; border-bottom: 1px solid #dde2ea; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} figure {{ margin: .6rem 0; }} figcaption {{ font-weight: 600; }}
.warnings {{ border: 2px solid #c62828; background: #fdecea; color: #8e1b1b; padding: .6rem 1rem; border-radius: 4px; }}
tr.warn td, tr.warn th, li.warn {{ color: #c62828; font-weight: 700; }}
{EXAMPLES_STYLE}
.label {{ font-size: 12px; fill: #1d2330; }} .value {{ font-size: 12px; fill: #1d2330; }} small {{ color: #667085; font-weight: 400; }}
</style></head><body>
<h1>Compression report</h1>
<p>Job <code id="job-id">{escape(job_id)}</code> · model <code>{escape(str(metrics.get('model_id', '')))}</code>
({escape(str(metrics.get('model_format', '')))}) · evaluated on {_fmt(metrics.get('eval_samples'))} samples of
<code>{escape(str(metrics.get('eval_dataset', '')))}</code> · metrics schema v{_fmt(metrics.get('schema_version'))}</p>
{_warnings(metrics.get("warnings", []))}
<h2>Before and after</h2>
<table id="summary"><thead><tr><th></th><th>original</th><th>compressed</th><th>change</th></tr></thead>
<tbody>{''.join(table)}</tbody></table>
{charts}
<h2>Fidelity against the original</h2>
<table id="fidelity"><thead><tr><th>output</th><th>top-1 agreement</th><th>cosine (mean)</th><th>max abs error</th><th>KL(softmax)</th><th>worst slice</th></tr></thead>
<tbody>{fidelity_rows}</tbody></table>
{_task(comparison.get('task'))}
{_task_metrics(metrics.get('task_metrics'))}
{task_section(metrics, pictures)}
{_preflight(metrics.get('preflight'))}
{f'<h2>Per-layer error (SQNR, dB; lowest first)</h2><table id="layers"><thead><tr><th>layer</th><th>op</th><th>SQNR dB</th></tr></thead><tbody>{layer_rows}</tbody></table>' if layers else ''}
<h2>Steps</h2><ol>{steps}</ol>
{''.join(_step_details(index, step) for index, step in enumerate(metrics.get("steps", [])))}
<h2>Environment</h2>
<p>{escape(str(environment.get('cpu', '')))} · {_fmt(environment.get('cpu_count'))} cores · VNNI {escape(str(environment.get('vnni')))}
· AMX {escape(str(environment.get('amx')))} · GPU {escape(str(environment.get('gpu') or 'none'))} · {_fmt(environment.get('threads'))} thread(s) for latency · {escape(versions)}</p>
</body></html>
"""


QUALITY_ROWS = (("before", "before"), ("after_pruning", "right after pruning"), ("after_recovery", "after recovery"),
                ("teacher", "teacher"), ("student_before", "student before training"), ("student_after", "student after training"))


def _quality(entry: dict | None) -> str:
    """"top-1 0.9810, agreement 0.9900", or "" when nothing was measured (no eval data)."""
    if not entry:
        return ""
    parts = [f"top-1 {_fmt(entry['top1'], 4)}"] if entry.get("top1") is not None else []
    if entry.get("top1_agreement") is not None:
        parts.append(f"agreement {_fmt(entry['top1_agreement'], 4)}")
    return escape(", ".join(parts))


TASK_METRIC_NAMES = {"map50": "mAP@0.5", "map50_95": "mAP@0.5:0.95", "map75": "mAP@0.75", "miou": "mIoU",
                     "pixel_accuracy": "pixel accuracy", "exact_match": "exact match", "cer": "CER",
                     "verification_accuracy": "verification accuracy (best threshold)",
                     "verification_accuracy_10fold": "verification accuracy (10 folds)",
                     "pck": "PCK (task threshold)", "pck_0_2": "PCK@0.2", "oks": "OKS-style similarity",
                     "mean_normalized_error": "mean normalised keypoint error"}


def _task_metrics(scored: dict | None) -> str:
    """The task metric of both models against the labels, and the drop (positive: worse)."""
    if not scored:
        return ""
    if scored.get("note"):
        return (f'<h2>Task metrics against the labels ({escape(scored["task"])})</h2>'
                f'<p id="task-metrics-note">{escape(scored["note"])}</p>')
    rows = "".join(_row(label, scored["original"].get(name), scored["compressed"].get(name),
                        f"drop {scored['drop'][name]:+.4f}" if name in scored["drop"] else "")
                   for name, label in TASK_METRIC_NAMES.items() if name in scored["original"])
    return (f'<h2>Task metrics against the labels ({escape(scored["task"])})</h2>'
            '<table id="task-metrics"><thead><tr><th></th><th>original</th><th>compressed</th><th>change</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _task(task: dict | None) -> str:
    """The task the model was judged as (and why), its label-free task figures, and missed floors."""
    if not task:
        return ""
    how = "inferred: " + task["reason"] if task.get("inferred") else "given with the job or at its model's upload"
    figures = task.get("fidelity") or {}
    rows = "".join(f"<tr><th>{escape(name)}</th><td>{_fmt(value, 4)}</td></tr>"
                   for name, value in figures.items() if not isinstance(value, dict))
    groups = "".join(f"<tr><th>{escape(name)} rows</th><td>cosine {_fmt(g['cosine'], 4)}, max abs error {_fmt(g['max_abs_error'], 4)}</td></tr>"
                     for name, g in (figures.get("groups") or {}).items())
    missed = "".join(f"<li>{escape(m['metric'])} is {_fmt(m['value'], 4)}, the floor is {_fmt(m['bound'], 4)}</li>"
                     for m in task.get("floor_shortfalls") or [])
    return (f'<h2>Task: {escape(task["task"]["type"])}</h2><p id="task-reason">{escape(how)}</p>'
            f'<table id="task-fidelity"><tbody>{rows}{groups}</tbody></table>'
            + (f'<div class="warnings" role="alert"><strong>Below the task floor</strong><ul>{missed}</ul></div>' if missed else ""))


def _preflight(checks: dict | None) -> str:
    """What the graph showed before the steps ran: wide joins first (they break 8-bit results)."""
    if not checks:
        return ""
    if "error" in checks:
        return f'<h2>Preflight</h2><p id="preflight">not completed: {escape(checks["error"])}</p>'
    items = []
    joins = checks.get("wide_joins")
    for join in (joins.get("joins") or []) if isinstance(joins, dict) and "error" not in joins else []:
        feeds = f", feeds output {', '.join(join['feeds_outputs'])}" if join["feeds_outputs"] else ""
        items.append(f'<li class="warn">{escape(join["op_type"])} <code>{escape(join["node"])}</code>: input ranges differ '
                     f'{_fmt(join["ratio"], 1)}x{escape(feeds)}. {escape(join["hint"])}</li>')
    for key, words in (("float_ops", "left float by the quantizer"), ("unknown_ops", "outside the ONNX domain")):
        found = checks.get(key)
        if isinstance(found, list) and found:
            listed = ", ".join(f"{escape(op.get('domain', '') + ('.' if op.get('domain') else '') + op['op_type'])} ×{op['count']}"
                               for op in found)
            items.append(f"<li>Ops {words}: {listed}</li>")
    dims = checks.get("dynamic_dims")
    if isinstance(dims, list) and dims:
        listed = ", ".join(f"{escape(d['tensor'])}[{d['axis']}]" for d in dims)
        items.append(f"<li>Dynamic dimensions: {listed}</li>")
    macs = checks.get("macs")
    if isinstance(macs, dict) and "error" not in macs:
        items.append(f"<li>MACs at batch 1: {_fmt(macs.get('batch_1'))} (input {escape(str(macs.get('input_shape')))}, "
                     f"from the {escape(str(macs.get('shape_from')))})</li>")
    errors = [key for key, value in checks.items() if isinstance(value, dict) and "error" in value]
    if errors:
        items.append(f"<li>Not checked (failed): {escape(', '.join(errors))}</li>")
    return (f'<h2>Preflight</h2><ul id="preflight">{"".join(items) or "<li>nothing found</li>"}</ul>'
            f'<p><small>{_fmt(checks.get("seconds"), 3)} s, before the first step</small></p>')


def _warnings(warnings: list[dict]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{escape(w['message'])}</li>" for w in warnings)
    return f'<div class="warnings" role="alert"><strong>⚠ Quality warning</strong><ul>{items}</ul></div>'


def _step_details(index: int, step: dict) -> str:
    """Per step: where it left the model (recipes), pruning's three measurements and per-layer
    table, training history."""
    html = []
    after = step.get("after_step")
    if after:
        measured = _quality(after)
        html.append(f"<p>After step {index + 1}: {_fmt(after.get('size_bytes'))} bytes{', ' + measured if measured else ''}</p>")
    quality = step.get("quality")
    if quality:
        # Prune: before / right after pruning / after recovery; distill: teacher / student before / after.
        rows = "".join(f"<tr><th>{label}</th><td>{_quality(quality[key])}</td></tr>"
                       for key, label in QUALITY_ROWS if _quality(quality.get(key)))
        if step.get("type") == "prune" and quality.get("after_recovery") is None:
            rows += "<tr><th>after recovery</th><td>no recovery (no <code>finetune</code>)</td></tr>"
        html.append(f'<table class="step-quality">{rows}</table>')
    if step.get("size_bytes_compressed"):
        html.append(f"<p>Dense file {_fmt(step['size_bytes_dense'])} bytes; compressed (model.onnx.zst) "
                    f"{_fmt(step['size_bytes_compressed'])} bytes. {escape(step.get('note', ''))}</p>")
    layers = step.get("layers") if step.get("type") == "prune" else None
    if layers and "out_channels" in layers[0]:
        rows = "".join(f"<tr><td>{escape(l['layer'])}</td><td>{l['out_channels'][0]} → {l['out_channels'][1]}</td>"
                       f"<td>{l['in_channels'][0]} → {l['in_channels'][1]}</td><td>{_fmt(l['parameters'][0])} → {_fmt(l['parameters'][1])}</td></tr>"
                       for l in layers)
        html.append(f'<table class="prune-layers"><thead><tr><th>layer</th><th>out channels</th><th>in channels</th><th>parameters</th></tr></thead><tbody>{rows}</tbody></table>')
    elif layers:
        rows = "".join(f"<tr><td>{escape(l['layer'])}</td><td>{_fmt(l['weights'])}</td><td>{_fmt(l['nonzero'][1])}</td><td>{_fmt(l['sparsity'], 4)}</td></tr>"
                       for l in layers)
        html.append(f'<table class="prune-layers"><thead><tr><th>layer</th><th>weights</th><th>non-zero</th><th>sparsity</th></tr></thead><tbody>{rows}</tbody></table>')
    for entry in step.get("left") or []:
        where = entry.get("layer") or ", ".join(entry.get("layers", []))
        html.append(f"<p>Left unpruned: {escape(where)} ({escape(entry['reason'])})</p>")
    history = (step.get("training") or {}).get("history") or []
    if history:
        rows = "".join(f"<tr><td>{h['epoch']}</td><td>{_fmt(h['loss'], 4)}</td><td>{_fmt(h.get('eval_score'), 4)}</td></tr>" for h in history)
        html.append(f'<table class="training"><thead><tr><th>epoch</th><th>loss</th><th>eval score</th></tr></thead><tbody>{rows}</tbody></table>')
    if not html:
        return ""
    return f"<h3>Step {index + 1}: {escape(step['type'])}</h3>" + "".join(html)


def _worst(entry: dict | None) -> str:
    if not entry:
        return "—"
    return f"axis {_fmt(entry.get('axis'))} index {_fmt(entry.get('index'))}: cosine {_fmt(entry.get('cosine'), 4)}"


# What the steps list shows of each step type, in this order, with its words.
SUMMARY_FIELDS = {
    "quantize": (("method", "method"), ("activation_type", "activations"), ("calibration", "calibration"),
                 ("calibration_samples", "calibration samples")),
    "prune": (("method", "method"), ("ratio", "ratio"), ("ratio_found", "ratio found"), ("importance", "importance")),
    "distill": (("student", "student"), ("teacher", "teacher")),
}


def _step_summary(step: dict) -> str:
    fields = SUMMARY_FIELDS.get(step["type"])
    if fields is None:  # a plug-in step: its plain values
        parts = [f"{k} {v}" for k, v in step.items() if k != "type" and isinstance(v, (int, float, str, bool))]
    else:
        parts = [f"{label} {_fmt(step[key], 4)}" for key, label in fields if step.get(key) is not None]
    if step["type"] == "prune":
        for key, label in (("parameters", "parameters"), ("macs", "MACs")):
            if step.get(key) and None not in step[key]:
                parts.append(f"{label} {_fmt(step[key][0])} → {_fmt(step[key][1])}")
        if step.get("method") != "channels":  # channel pruning removes weights: it leaves no zeros
            parts.append(f"sparsity {_fmt(step.get('sparsity'), 3)}")
    if step.get("size_bytes") is not None:
        parts.append(f"{_fmt(step['size_bytes'])} bytes")
    guard = step.get("guard")
    if guard:
        verdict = "met" if guard["met"] else "NOT met"
        parts.append(f"guard {guard['criterion']} {verdict} on {guard['holdout_samples']} held-out samples "
                     f"(candidate {guard['candidate_holdout']}, original {guard['original_holdout']})")
        parts += [f"kept float: {entry['layer']} ({entry['reason']})" for entry in guard["kept_float"]]
    for search in (guard, step.get("repair")):
        if search and search.get("pareto"):
            parts.append("Pareto set (size, batch-1 ms, artifact): " + ", ".join(
                f"{entry['attempt']} ({entry['size_bytes']:,d} B, {_fmt(entry['p50_ms_batch_1'])} ms, "
                f"{entry['artifact'] or 'not stored'})" for entry in search["pareto"]))
    repair = step.get("repair")
    if repair and repair.get("needed"):
        missed = ", ".join(f"{m['metric']} {_fmt(m['value'], 4)} < {m['bound']}" for m in repair["trigger"])
        tried = [a["attempt"] for a in repair["attempts"] if "tune" in a]
        outcome = f"repaired by {tried[-1]}" if repair["met"] else "no candidate met it, the best is kept"
        parts.append(f"below the floor as asked ({missed}): {outcome} ({len(tried)} candidates)")
        parts += [f"kept float: {entry['layer']} ({entry['reason']})" for entry in repair["kept_float"]]
    parts += [f"left float: {entry['layer']} ({entry['reason']})" for entry in step.get("float_layers", [])]
    return "; ".join(parts)
