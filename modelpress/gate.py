"""CI gates on a finished job: `--gate "top1_drop<=0.5,speedup_b32>=1.5,size_ratio>=3"`.

A gate is `metric OP number` with OP one of `<=`, `>=`, `<`, `>`, gates separated by commas. Metric
names are the job's headline figures (docs/METRICS.md); a gate whose figure the job did not measure
(top-1 without labelled eval data) fails, since a CI check that cannot be checked must not pass.
The results go to the terminal, a JUnit XML file (`--junit`) and, in GitHub Actions, the step
summary (`$GITHUB_STEP_SUMMARY`).
"""

import math
import operator
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _comparison(metrics: dict, key: str) -> float | None:
    return (metrics.get("comparison") or {}).get(key)


def _first_fidelity(metrics: dict, key: str) -> float | None:
    outputs = (metrics.get("comparison") or {}).get("fidelity") or []
    return outputs[0].get(key) if outputs else None


def _points(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _compressed_mib(metrics: dict) -> float | None:
    size = (metrics.get("compressed") or {}).get("size_bytes")
    return None if size is None else size / (1024 * 1024)


def _compressed_top1(metrics: dict) -> float | None:
    accuracy = (metrics.get("compressed") or {}).get("accuracy") or {}
    return accuracy.get("top1")


# name -> (what it is, how it is read from metrics.json). The drop is in points, as --max-accuracy-drop
# takes it; accuracy and agreement are fractions (0..1), as metrics.json and the task floors give them.
METRICS: dict[str, tuple[str, Callable[[dict], float | None]]] = {
    "size_ratio": ("original size / compressed size", lambda m: _comparison(m, "size_ratio")),
    "speedup_b1": ("batch-1 p50 speed-up (original / compressed)", lambda m: _comparison(m, "speedup_batch_1")),
    "speedup_b32": ("batch-32 p50 speed-up", lambda m: _comparison(m, "speedup_batch_32")),
    "top1_drop": ("top-1 accuracy drop in points (labelled eval data)", lambda m: _points(_comparison(m, "accuracy_drop"))),
    "top1": ("compressed top-1 accuracy, 0..1 (labelled eval data)", _compressed_top1),
    "top1_agreement": ("how often both models pick the same class, 0..1 (first output)",
                       lambda m: _first_fidelity(m, "top1_agreement")),
    "cosine": ("mean cosine similarity of the first output", lambda m: _first_fidelity(m, "cosine_mean")),
    "size_mib": ("compressed model size in MiB", _compressed_mib),
}

OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
# Bounds: a gate line is typed by a person; nothing needs more.
MAX_GATE_CHARS = 1000
MAX_GATES = 32
_CONDITION = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class GateSyntaxError(ValueError):
    """The gate text does not parse or names an unknown metric (a usage error)."""


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None
    passed: bool

    @property
    def message(self) -> str:
        if self.value is None:
            return f"{self.gate.metric} was not measured by this job (needs {self.gate.op} {self.gate.threshold:g})"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.gate.metric} = {self.value:.4g}, needs {self.gate.op} {self.gate.threshold:g}: {verdict}"


def parse(text: str) -> list[Gate]:
    if len(text) > MAX_GATE_CHARS:
        raise GateSyntaxError(f"--gate is longer than {MAX_GATE_CHARS} characters")
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise GateSyntaxError('--gate is empty; e.g. --gate "top1_drop<=0.5,size_ratio>=3"')
    if len(parts) > MAX_GATES:
        raise GateSyntaxError(f"--gate has {len(parts)} conditions; at most {MAX_GATES}")
    gates = []
    for part in parts:
        match = _CONDITION.match(part)
        if match is None:
            raise GateSyntaxError(f"--gate condition {part.strip()!r} is not METRIC<=|>=|<|>NUMBER (e.g. size_ratio>=3)")
        name, op, number = match.groups()
        if name not in METRICS:
            raise GateSyntaxError(f"--gate: unknown metric {name!r}; known: {', '.join(METRICS)}")
        threshold = float(number)
        if not math.isfinite(threshold):
            raise GateSyntaxError(f"--gate condition {part.strip()!r}: the threshold must be a finite number")
        gates.append(Gate(name, op, threshold))
    return gates


def evaluate(gates: list[Gate], metrics: dict) -> list[GateResult]:
    results = []
    for gate in gates:
        value = METRICS[gate.metric][1](metrics or {})
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        results.append(GateResult(gate, value, value is not None and OPERATORS[gate.op](value, gate.threshold)))
    return results


def write_junit(path: str | Path, *, job_id: str, job_status: str, job_error: dict | None, results: list[GateResult]) -> Path:
    """One testsuite: the job itself (failed unless it succeeded), then one testcase per gate."""
    failures = sum(not r.passed for r in results) + (job_status != "succeeded")
    suite = ET.Element("testsuite", name="modelpress", tests=str(len(results) + 1), failures=str(failures), errors="0")
    job_case = ET.SubElement(suite, "testcase", classname="modelpress.job", name=f"job {job_id}")
    if job_status != "succeeded":
        error = job_error or {}
        ET.SubElement(job_case, "failure", message=f"job {job_status}: {error.get('code', job_status)}",
                      type=error.get("code") or job_status).text = error.get("message") or ""
    for result in results:
        case = ET.SubElement(suite, "testcase", classname="modelpress.gate", name=str(result.gate))
        if not result.passed:
            ET.SubElement(case, "failure", message=result.message, type="gate_failed")
        ET.SubElement(case, "system-out").text = result.message
    root = ET.Element("testsuites")
    root.append(suite)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def markdown_summary(*, job_id: str, job_status: str, results: list[GateResult]) -> str:
    """A GitHub step summary: the job, then a table of the gates."""
    lines = [f"### modelpress job `{job_id}`: {job_status}", "", "| gate | value | result |", "|---|---|---|"]
    for result in results:
        value = "not measured" if result.value is None else f"{result.value:.4g}"
        lines.append(f"| `{result.gate}` | {value} | {'pass' if result.passed else '**FAIL**'} |")
    return "\n".join(lines) + "\n\n"
