"""The CI gate (issue #15 part 6): `modelpress compress ... --gate` exits 3 when a gate fails,
`--junit` writes a JUnit report, $GITHUB_STEP_SUMMARY gets a table, a gate that does not parse is
a usage error before anything is uploaded; and the examples' own commands (GitHub Actions
workflow, Airflow DAG) run against a live embedded server."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
import yaml

from modelpress import gate
from tests.stack import embedded_server

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "modelpress")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with embedded_server(tmp_path_factory.mktemp("gate") / "data") as (url, _):
        yield url


def cli(*args, url: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], env={**os.environ, "MODELPRESS_URL": url, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def junit_cases(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    return {case.get("name"): case for case in root.iter("testcase")}


# --- the grammar ------------------------------------------------------------------------------------

def test_parse_the_grammar():
    assert gate.parse(" top1_drop<=0.5, speedup_b32 >= 1.5,size_ratio>3 ,size_mib<2e1") == [
        gate.Gate("top1_drop", "<=", 0.5), gate.Gate("speedup_b32", ">=", 1.5), gate.Gate("size_ratio", ">", 3.0),
        gate.Gate("size_mib", "<", 20.0)]


@pytest.mark.parametrize("text", ["size_ratio=>3", "size_ratio==3", "size_ratio>=", ">=3", "size_ratio>=three", "",
                                  " , ", "size_ratio>=3;top1_drop<=1", "size_ratio>=nan", "size_ratio>=inf",
                                  ",".join(["size_ratio>=1"] * 33), "size_ratio>=" + "1" * 1000])
def test_bad_gate_text_is_refused(text):
    with pytest.raises(gate.GateSyntaxError):
        gate.parse(text)


def test_an_unknown_metric_names_the_known_ones():
    with pytest.raises(gate.GateSyntaxError) as refused:
        gate.parse("size_ratio>=3,accuracy>=0.9")
    assert "'accuracy'" in str(refused.value) and all(name in str(refused.value) for name in gate.METRICS)


def test_evaluate_reads_metrics_json():
    metrics = {"comparison": {"size_ratio": 3.6, "speedup_batch_32": 1.2, "accuracy_drop": 0.004,
                              "fidelity": [{"top1_agreement": 0.995, "cosine_mean": 0.9991}]},
               "compressed": {"size_bytes": 3 * 1024 * 1024, "accuracy": {"top1": 0.97}}}
    results = gate.evaluate(gate.parse("size_ratio>=3,speedup_b32>=1.5,top1_drop<=0.5,top1_agreement>=0.99,"
                                       "cosine>0.999,size_mib<=3,top1>=0.97,speedup_b1>=1"), metrics)
    assert [(str(r.gate), r.passed) for r in results] == [
        ("size_ratio>=3", True), ("speedup_b32>=1.5", False), ("top1_drop<=0.5", True), ("top1_agreement>=0.99", True),
        ("cosine>0.999", True), ("size_mib<=3", True), ("top1>=0.97", True), ("speedup_b1>=1", False)]
    assert results[2].value == pytest.approx(0.4)  # points
    assert results[-1].value is None and "not measured" in results[-1].message  # a gate that cannot be checked fails


# --- the CLI against a live server -----------------------------------------------------------------

def test_gates_pass_exit_0_with_a_junit_report(server, reference, tmp_path):
    summary = tmp_path / "summary.md"
    done = cli("compress", str(reference.onnx), "--method", "dynamic_int8", "--eval", str(reference.eval_npz),
               "--gate", "size_ratio>=1.5,top1_drop<=100", "--junit", str(tmp_path / "out" / "gate.xml"),
               "--output", str(tmp_path / "out"), "--json", url=server, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 0, done.stdout + done.stderr
    payload = json.loads(done.stdout)
    assert [g["passed"] for g in payload["gates"]] == [True, True]
    assert payload["gates"][0]["value"] == pytest.approx(payload["job"]["metrics"]["comparison"]["size_ratio"])
    cases = junit_cases(tmp_path / "out" / "gate.xml")
    assert set(cases) == {f"job {payload['job']['id']}", "size_ratio>=1.5", "top1_drop<=100"}
    assert not any(case.find("failure") is not None for case in cases.values())
    suite = ET.parse(tmp_path / "out" / "gate.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("3", "0")
    table = summary.read_text()
    assert payload["job"]["id"] in table and re.search(r"\| `size_ratio>=1.5` \| [\d.]+ \| pass \|", table)


def test_a_failed_gate_exits_3_and_says_which(server, reference, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    done = cli("compress", str(reference.onnx), "--method", "dynamic_int8", "--eval", str(reference.eval_npz),
               "--gate", "size_ratio>=1000,top1_drop<=100", "--junit", str(tmp_path / "gate.xml"),
               "--output", str(tmp_path / "out"), url=server, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 3, done.stdout + done.stderr
    assert "gate failed: size_ratio" in done.stderr and "top1_drop" not in done.stderr
    assert "GATE      size_ratio" in done.stdout
    cases = junit_cases(tmp_path / "gate.xml")
    failure = cases["size_ratio>=1000"].find("failure")
    assert failure is not None and "needs >= 1000" in failure.get("message")
    assert cases["top1_drop<=100"].find("failure") is None
    assert next(c for name, c in cases.items() if name.startswith("job ")).find("failure") is None  # the job itself succeeded
    table = summary.read_text()
    assert table.startswith("earlier step\n") and "| `size_ratio>=1000` |" in table and "**FAIL**" in table


@pytest.mark.parametrize("text, says", [("size_ratio=>3", "is not METRIC"), ("speed>=2", "known: size_ratio")])
def test_bad_gate_syntax_is_a_usage_error_before_any_upload(server, reference, tmp_path, text, says):
    models_before = httpx.get(f"{server}/v1/models").json()["items"]
    done = cli("compress", str(reference.onnx), "--gate", text, "--output", str(tmp_path / "out"), url=server)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert httpx.get(f"{server}/v1/models").json()["items"] == models_before


# --- the examples' commands ------------------------------------------------------------------------

def _ci_workspace(tmp_path: Path, reference) -> Path:
    """A checkout as the workflow expects it: models/resnet.onnx, data/calibration.npz, data/eval.npz."""
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    shutil.copy(reference.onnx, tmp_path / "models" / "resnet.onnx")
    shutil.copy(reference.calib_npz, tmp_path / "data" / "calibration.npz")
    shutil.copy(reference.eval_npz, tmp_path / "data" / "eval.npz")
    return tmp_path


def _check_gated_run(done: subprocess.CompletedProcess, job: dict, junit: Path, gates: str) -> None:
    """The exit code and the report agree with the gates evaluated here on the job's own metrics
    (whether this small model's int8 twin is 1.5x faster depends on the machine; the verdict must not)."""
    expected = gate.evaluate(gate.parse(gates), job["metrics"])
    assert job["status"] == "succeeded"
    assert done.returncode == (3 if any(not r.passed for r in expected) else 0), done.stderr
    cases = junit_cases(junit)
    for result in expected:
        assert (cases[str(result.gate)].find("failure") is None) == result.passed, str(result.gate)


def test_the_github_actions_example_runs_against_a_live_server(server, reference, tmp_path):
    workflow = yaml.safe_load((EXAMPLES / "github-actions-compress.yml").read_text())
    step = next(s for s in workflow["jobs"]["compress"]["steps"] if s.get("name", "").startswith("Compress"))
    workspace, summary = _ci_workspace(tmp_path, reference), tmp_path / "step-summary.md"
    done = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=workspace, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, "MODELPRESS_URL": server, "GITHUB_STEP_SUMMARY": str(summary),
                                                         "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    job = json.loads((workspace / "compressed" / "job.json").read_text())["job"]
    gates = re.search(r'--gate "([^"]+)"', step["run"]).group(1)
    _check_gated_run(done, job, workspace / "compressed" / "gate.xml", gates)
    assert (workspace / "compressed" / "model.onnx").is_file()
    assert f"modelpress job `{job['id']}`" in summary.read_text()
    assert any(s.get("with", {}).get("report_paths") == "compressed/gate.xml" for s in workflow["jobs"]["compress"]["steps"])


def _bash_operator(source: str) -> tuple[str, dict]:
    """The BashOperator's bash_command and params, read from the DAG file (no Airflow needed)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BashOperator":
            keywords = {k.arg: k.value for k in node.keywords}
            return ast.literal_eval(keywords["bash_command"]), ast.literal_eval(keywords["params"])
    raise AssertionError("no BashOperator in the DAG")


def test_the_airflow_example_runs_against_a_live_server(server, reference, tmp_path):
    command, params = _bash_operator((EXAMPLES / "airflow_compress_dag.py").read_text())
    params |= {"model": str(reference.onnx), "calibration": str(reference.calib_npz), "eval": str(reference.eval_npz),
               "output": str(tmp_path / "compressed")}
    # Airflow's Jinja, for the two names the command uses.
    rendered = re.sub(r"\{\{\s*params\.(\w+)\s*\}\}", lambda m: params[m.group(1)], command)
    rendered = re.sub(r"\{\{\s*run_id\s*\}\}", "manual__2026-12-02", rendered)
    assert "{{" not in rendered
    done = subprocess.run(["bash", "-c", rendered], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "MODELPRESS_URL": server, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    run_dir = tmp_path / "compressed" / "manual__2026-12-02"
    job = json.loads(done.stdout)["job"]  # the XCom value: the CLI's JSON
    _check_gated_run(done, job, run_dir / "gate.xml", params["gate"])
    assert (run_dir / "model.onnx").is_file()
