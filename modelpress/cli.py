"""`modelpress`: compress a model from a shell, a CI job or a pipeline step.

Exit codes (stable): 0 succeeded, 1 job failed, 2 usage error (including a request the server
refused as invalid, a --url without http:// or https://, and a --gate that does not parse),
3 accuracy guard or safety floor not met, --max-accuracy-drop exceeded or a --gate failed, 4 server unreachable
(or the URL answers but is not modelpress).
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from modelpress import gate as ci_gate
from modelpress.client import STATUSES, Client, Job
from modelpress.resumable import UploadProgressBar
from modelpress.errors import FidelityFloorNotMet, GuardNotMet, JobCancelled, JobFailed, ModelpressError, ServerUnreachable, WaitTimeout

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_GUARD, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class UsageError(Exception):
    pass


def _ref(value: str | None, upload, prefix: str, kind: str) -> str | None:
    """A file is uploaded and its new id returned; an id is used as it is."""
    if value is None:
        return None
    if Path(value).is_file():
        return upload(Path(value)).id
    if value.startswith(prefix):
        return value
    raise UsageError(f"{value} is neither a file nor a {kind} id ({prefix}...)")


def _model_ref(client: Client, value: str) -> str:
    return _ref(value, client.model_for_file, "mdl_", "model")  # the same file again: its first upload


def _dataset_ref(client: Client, value: str | None) -> str | None:
    return _ref(value, client.upload_dataset, "ds_", "dataset")


def _json_object(text: str, flag: str, *, not_json: str, takes: str) -> dict:
    """A flag's JSON object, or a UsageError that names the flag and what it takes."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {not_json}: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{flag} takes {takes}")
    return value


def _parse_step(text: str) -> dict:
    takes = 'a JSON object like {"type": "quantize", "params": {...}}'
    step = _json_object(text, "--step", not_json="is not JSON", takes=takes)
    if "type" not in step:
        raise UsageError(f"--step takes {takes}")
    return step


def _parse_task(text: str | None) -> dict | None:
    """--task: a task type (`detection`) or a whole task as JSON."""
    if text is None:
        return None
    if re.fullmatch(r"[a-z_]+", text):
        return {"type": text}
    return _json_object(text, "--task", not_json="is neither a task type (e.g. detection) nor JSON",
                        takes='a type name or a JSON object like {"type": "detection", "decoder": {"kind": "yolo"}}')


def _parse_floor(text: str | None):
    """--floor: default, off, or JSON bounds by metric, e.g. '{"top1_agreement": 0.97}'."""
    if text is None or text in ("default", "off"):
        return text
    return _json_object(text, "--floor", not_json="is neither default, off nor JSON",
                        takes='default, off or a JSON object like {"top1_agreement": 0.97}')


# The server names the body's fields; the CLI user typed flags.
FLAG_FOR_FIELD = {"data.calibration": "--calibration", "data.eval": "--eval", "data.train": "--train",
                  "data.split": "--split", "model_id": "MODEL"}


def _in_flags(message: str) -> str:
    return re.sub(r"\b(data\.(?:calibration|eval|train|split)|model_id)\b", lambda m: FLAG_FOR_FIELD[m.group(1)], message)


def _loud(text: str) -> str:
    """Red and bold on a terminal (unless NO_COLOR is set); the words say it either way."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[1;31m{text}\033[0m"
    return text


def _accuracy_drop_points(job: Job) -> float | None:
    drop = job.metrics.get("comparison", {}).get("accuracy_drop")
    return None if drop is None else 100 * drop


def _summary(job: Job, max_drop_points: float | None = None) -> str:
    metrics = job.metrics
    before, after, comparison = metrics.get("original", {}), metrics.get("compressed", {}), metrics.get("comparison", {})
    lines = [f"job {job.id}: {job.status}"]
    if before and after:
        lines.append(f"  size      {before['size_bytes'] / 1024:,.1f} KiB -> {after['size_bytes'] / 1024:,.1f} KiB "
                     f"({comparison.get('size_ratio', 0):.2f}x smaller)")
        for key in ("batch_1", "batch_32"):
            b, a = before.get("latency", {}).get(key), after.get("latency", {}).get(key)
            if b and a:
                lines.append(f"  latency   {key.replace('_', ' ')}: p50 {b['p50_ms']:.3f} ms -> {a['p50_ms']:.3f} ms "
                             f"({comparison.get(f'speedup_{key}', 0):.2f}x)")
        if before.get("accuracy") and after.get("accuracy"):
            lines.append(f"  accuracy  top-1 {before['accuracy']['top1']:.4f} -> {after['accuracy']['top1']:.4f} "
                         f"(drop {100 * comparison.get('accuracy_drop', 0):.2f} points)")
        for output in comparison.get("fidelity", []):
            agreement = f"top-1 agreement {output['top1_agreement']:.4f}, " if "top1_agreement" in output else ""
            lines.append(f"  fidelity  output {output['output']}: {agreement}cosine {output['cosine_mean']:.5f}")
    warnings = [w["message"] for w in metrics.get("warnings", [])]
    drop = _accuracy_drop_points(job)
    if max_drop_points is not None and drop is not None and drop > max_drop_points:
        warnings.insert(0, f"top-1 fell {drop:.1f} points, more than --max-accuracy-drop {max_drop_points:g}")
    lines += [_loud(f"  WARNING   {message}") for message in warnings]
    floor = metrics.get("floor") or {}
    lines += [_loud(f"  FLOOR     {m['metric']} {'unmeasured' if m['value'] is None else format(m['value'], '.4f')} "
                    f"is below the floor {m['bound']:g}") for m in floor.get("shortfalls", []) if floor.get("mode") != "off"]
    if job.error:
        lines.append(f"  error     {job.error['code']}: {_in_flags(job.error['message'])}")
    return "\n".join(lines)


def _emit(args, payload, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def _finish(args, client: Client, job: Job) -> int:
    """Wait (unless --no-wait), download into --output, print; the exit code follows the job."""
    if not args.wait:
        _emit(args, {"job": job.raw}, f"submitted {job.id} ({job.status})")
        return EXIT_OK
    failure = None
    try:
        job.wait(timeout=args.timeout, progress=not args.json)
    except (JobFailed, JobCancelled) as exc:
        failure = exc
    downloaded, download_error = {}, None
    output = getattr(args, "output", None)
    if output and job.artifacts:
        try:
            for name in job.artifacts:
                downloaded[name] = str(job.download(name, to=Path(output) / name))
        except ModelpressError as exc:  # the job's own outcome still decides the exit code
            download_error = exc
    max_drop = getattr(args, "max_accuracy_drop", None)
    gates = getattr(args, "gates", None) or []
    gate_results = ci_gate.evaluate(gates, job.metrics) if gates else []
    text = _summary(job, max_drop) + "".join(f"\n  saved     {path}" for path in downloaded.values())
    text += "".join(f"\n  gate      {r.message}" if r.passed else "\n" + _loud(f"  GATE      {r.message}") for r in gate_results)
    payload = {"job": job.raw, "downloaded": downloaded,
               "download_error": download_error and {"code": download_error.code, "message": download_error.message}}
    if gates:
        payload["gates"] = [{"gate": str(r.gate), "value": r.value, "passed": r.passed} for r in gate_results]
    _emit(args, payload, text)
    _report_gates(args, job, gate_results)
    if download_error is not None:
        print(f"modelpress: download failed: {download_error.code}: {download_error.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if isinstance(download_error, ServerUnreachable) else EXIT_JOB_FAILED
    if isinstance(failure, (GuardNotMet, FidelityFloorNotMet)):
        return EXIT_GUARD
    if failure:
        return EXIT_JOB_FAILED
    drop = _accuracy_drop_points(job)
    if max_drop is not None and drop is not None and drop > max_drop:
        return EXIT_GUARD
    return EXIT_GUARD if any(not r.passed for r in gate_results) else EXIT_OK


def _report_gates(args, job: Job, results: list) -> None:
    """--junit FILE and, in GitHub Actions, the step summary; the failed gates on stderr."""
    for result in results:
        if not result.passed:
            print(f"modelpress: gate failed: {result.message}", file=sys.stderr)
    if getattr(args, "junit", None):
        ci_gate.write_junit(args.junit, job_id=job.id, job_status=job.status, job_error=job.error, results=results)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and (results or getattr(args, "junit", None)):
        with open(summary, "a", encoding="utf-8") as out:
            out.write(ci_gate.markdown_summary(job_id=job.id, job_status=job.status, results=results))


def cmd_compress(args, client: Client) -> int:
    try:  # before anything is uploaded: a typo in a gate costs no job
        args.gates = ci_gate.parse(args.gate) if args.gate is not None else []
    except ci_gate.GateSyntaxError as exc:
        raise UsageError(str(exc)) from exc
    if (args.gates or args.junit) and not args.wait:
        raise UsageError("--gate and --junit need the job's result: drop --no-wait")
    body = {}
    if args.recipe:
        try:
            body = json.loads(Path(args.recipe).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--recipe {args.recipe}: {exc}") from exc
    steps = [_parse_step(s) for s in args.step]
    if args.method:
        steps.insert(0, {"type": "quantize", "params": {"method": args.method}})
    preset = args.preset or (body.get("preset") if not steps and not body.get("steps") else None)
    if preset and steps:
        raise UsageError("--preset replaces the steps: give --preset or --method/--step, not both")
    if not preset:
        steps = steps or body.get("steps") or [{"type": "quantize", "params": {"method": "static_int8"}}]
    data = dict(body.get("data") or {})
    for role in ("calibration", "eval", "train"):
        ref = _dataset_ref(client, getattr(args, role))
        if ref:
            data[role] = ref
    if args.split:
        if not 0 < args.eval_fraction < 1:
            raise UsageError(f"--eval-fraction must be between 0 and 1 (got {args.eval_fraction})")
        data["split"] = {"dataset": _dataset_ref(client, args.split), "eval_fraction": args.eval_fraction}
    task = _parse_task(args.task) or body.get("task")
    floor = _parse_floor(args.floor) or body.get("floor")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    job = client.submit(_model_ref(client, args.model), None if preset else steps, data=data, preset=preset,
                        task=task, floor=floor)
    if not args.json:
        print(f"submitted {job.id}", file=sys.stderr)
    return _finish(args, client, job)


def _list_line(job: dict) -> str:
    line = f"{job['id']}  {job['status']:<9}  {job['progress'] * 100:5.1f}%  {job['stage']}"
    headline = job.get("headline") or {}
    if headline.get("size_ratio"):
        line += f"  {headline['size_ratio']:.2f}x smaller"
    if headline.get("accuracy_drop") is not None:
        line += f", top-1 drop {100 * headline['accuracy_drop']:.2f} points"
    return line


def cmd_jobs(args, client: Client) -> int:
    if args.action == "list":
        # Summaries: one request for the page, no metrics (`jobs show ID` has them).
        jobs = [job.raw for _, job in zip(range(args.limit), client.jobs(status=args.status, limit=args.limit))]
        _emit(args, jobs, "\n".join(_list_line(j) for j in jobs))
        return EXIT_OK
    if not args.job_id:
        raise UsageError(f"jobs {args.action} needs a job id")
    job = client.job(args.job_id)
    if args.action == "show":
        _emit(args, job.raw, _summary(job))
        return EXIT_OK
    if args.action == "cancel":
        job.cancel()
        stopping = " (its worker stops it at its next check; `jobs wait` for the end)" if job.status == "cancelling" else ""
        _emit(args, job.raw, f"{job.id}: {job.status}{stopping}")
        return EXIT_OK
    if args.action == "download":
        args.wait = True
        if not args.output:
            raise UsageError("jobs download needs --output DIR")
    return _finish(args, client, job)


def cmd_models(args, client: Client) -> int:
    if args.action == "list":
        models = [m.raw for _, m in zip(range(args.limit), client.models())]
        _emit(args, models, "\n".join(f"{m['id']}  {m['format']:<12} {m['size_bytes']:>12,d}  {m['name']}" for m in models))
    elif args.action == "show":
        if not args.target:
            raise UsageError("models show needs a model id")
        model = client.model(args.target).raw
        _emit(args, model, json.dumps(model, indent=2))
    elif args.action == "set-task":
        if not args.target or args.task is None:
            raise UsageError("models set-task needs a model id and --task (a type, a task as JSON, or null to clear)")
        task = None if args.task.strip() == "null" else _parse_task(args.task)
        model = client.update_model(args.target, task=task).raw
        _emit(args, model, f"{model['id']}  task: {json.dumps(model['task'])}")
    else:
        if not args.target:
            raise UsageError("models upload needs a file")
        model = client.upload_model(args.target, name=args.name, task=_parse_task(args.task)).raw
        _emit(args, model, f"{model['id']}  {model['format']}  {model['size_bytes']:,d} bytes")
    return EXIT_OK


def cmd_datasets(args, client: Client) -> int:
    dataset = client.upload_dataset(args.file, name=args.name).raw
    _emit(args, dataset, f"{dataset['id']}  {dataset['count']} images {dataset['shape']}  labels: {dataset['has_labels']}")
    return EXIT_OK


def cmd_presets(args, client: Client) -> int:
    listed = client.presets()
    text = "\n".join(f"{p['name']:<10} {' -> '.join(s['type'] for s in p['steps']):<28} {p['description']}" for p in listed)
    _emit(args, listed, text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server URL (default: $MODELPRESS_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="API key (default: $MODELPRESS_API_KEY)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="wait for the job to finish (default)")
    waiting.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")

    parser = argparse.ArgumentParser(prog="modelpress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", parents=[common, waiting], help="upload, compress, wait, download")
    compress.add_argument("model", help="a model file (ONNX, .pt2, TorchScript) or a model id")
    compress.add_argument("--method", help="quantize method, e.g. static_int8")
    compress.add_argument("--step", action="append", default=[], help='a step as JSON, e.g. \'{"type": "quantize", "params": {}}\' (repeatable)')
    compress.add_argument("--preset", help="a named recipe instead of steps, e.g. edge-int8 (list: modelpress presets)")
    compress.add_argument("--recipe", help="a recipe.json (a POST /v1/jobs body); its steps and data are used")
    compress.add_argument("--calibration", help="calibration data: an .npz file or a dataset id")
    compress.add_argument("--eval", help="evaluation data: an .npz file or a dataset id")
    compress.add_argument("--train", help="training data: an .npz file or a dataset id")
    compress.add_argument("--split", help="one labelled dataset (.npz or id) split into eval and the rest (calibration, train)")
    compress.add_argument("--eval-fraction", type=float, default=0.2, help="--split: the share held out for evaluation (default 0.2)")
    compress.add_argument("--task", help='the job\'s task, what the model is for: a type (classification, detection, '
                          'segmentation, ctc, embedding) or a task as JSON; default: the task given at the model\'s '
                          'upload (`models upload --task`), else inferred from the output shapes')
    compress.add_argument("--floor", help='the safety floor: default, off, or bounds as JSON, e.g. \'{"top1_agreement": 0.97}\' '
                          '(a result below it fails the job, exit 3)')
    compress.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                          help="exit 3 when top-1 falls more than this many points (a drop over 5 is always flagged)")
    compress.add_argument("--gate", metavar="CONDITIONS",
                          help='exit 3 unless every condition holds, e.g. "top1_drop<=0.5,speedup_b32>=1.5,size_ratio>=3" '
                               f"(metrics: {', '.join(ci_gate.METRICS)}; top1_drop in points)")
    compress.add_argument("--junit", metavar="FILE", help="write a JUnit XML report: the job and one testcase per gate")
    compress.add_argument("--output", required=True, help="folder for the downloaded artifacts")
    compress.set_defaults(handler=cmd_compress)

    jobs = commands.add_parser("jobs", parents=[common, waiting], help="list, show, cancel, wait for or download jobs")
    jobs.add_argument("action", choices=["list", "show", "cancel", "wait", "download"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--status", choices=list(STATUSES))
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--output", help="folder for downloaded artifacts (wait, download)")
    jobs.set_defaults(handler=cmd_jobs)

    models = commands.add_parser("models", parents=[common], help="list, show, upload models or change a model's task")
    models.add_argument("action", choices=["list", "show", "upload", "set-task"])
    models.add_argument("target", nargs="?", help="a model id (show, set-task) or a file (upload)")
    models.add_argument("--name")
    models.add_argument("--task", help="upload, set-task: what the model is for, a type (e.g. detection) or a task as "
                        "JSON; its jobs use it unless they give their own (default: inferred per job). "
                        "set-task --task null clears it")
    models.add_argument("--limit", type=int, default=20)
    models.set_defaults(handler=cmd_models)

    datasets = commands.add_parser("datasets", parents=[common], help="upload datasets")
    datasets.add_argument("action", choices=["upload"])
    datasets.add_argument("file")
    datasets.add_argument("--name")
    datasets.set_defaults(handler=cmd_datasets)

    presets = commands.add_parser("presets", parents=[common], help="list the named recipes for --preset")
    presets.set_defaults(handler=cmd_presets)
    return parser


def _exit_code(exc: Exception) -> int:
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, ServerUnreachable):
        return EXIT_UNREACHABLE
    if isinstance(exc, WaitTimeout):
        return EXIT_JOB_FAILED
    if exc.status is not None and 400 <= exc.status < 500:
        return EXIT_USAGE  # the server refused the request as given (unknown id, invalid params)
    if exc.status in (502, 503, 504):
        return EXIT_UNREACHABLE  # still unavailable after the retries
    return EXIT_JOB_FAILED


def _report_error(args, exc: Exception) -> int:
    """stderr for a person; with --json one JSON object on stdout, as every other answer."""
    code = "usage_error" if isinstance(exc, UsageError) else exc.code
    message = _in_flags(str(exc) if isinstance(exc, UsageError) else exc.message)
    exit_code = _exit_code(exc)
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message, "exit_code": exit_code}}, indent=2))
    else:
        print(f"modelpress: {'error' if isinstance(exc, UsageError) else code}: {message}", file=sys.stderr)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = args.url or os.environ.get("MODELPRESS_URL")
    if url and not url.startswith(("http://", "https://")):
        return _report_error(args, UsageError(f"--url {url} needs a scheme: http://{url} or https://{url}"))
    # Upload progress on stderr for a person; --json keeps stderr for errors only.
    client = Client(base_url=args.url, api_key=args.api_key,
                    upload_progress=None if args.json else UploadProgressBar(sys.stderr))
    try:
        return args.handler(args, client)
    except (UsageError, ModelpressError) as exc:
        return _report_error(args, exc)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
