"""The README's first steps, run as written: `make example`, then its CLI and curl blocks against
the embedded server on the README's PORT. A README command that stops working fails here."""

import re
import subprocess
from pathlib import Path

from tests.stack import embedded_server
from tests.test_make_run import ROOT

VENV_BIN = ROOT / ".venv" / "bin"


def readme_block(containing: str) -> str:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if containing in block)


def test_readme_example_model_cli_and_curl_blocks_work(tmp_path):
    example = subprocess.run(["make", "-s", "example", f"EXAMPLE_OUT={tmp_path / 'example'}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert example.returncode == 0, example.stderr[-3000:]
    assert {"resnet-digits.onnx", "digits-calib.npz", "digits-test.npz"} <= {p.name for p in (tmp_path / "example").iterdir()}

    with embedded_server(tmp_path / "data") as (url, _):  # on a free port, never 8000: the README must follow PORT
        env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "PORT": url.rsplit(":", 1)[1], "NO_COLOR": "1"}
        cli = readme_block("modelpress compress").replace(".venv/bin/", f"{VENV_BIN}/")
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", cli], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "report.html").is_file()

        curl = readme_block("curl -s -F")
        curl_dir = tmp_path / "curl"
        curl_dir.mkdir()
        (curl_dir / "example").symlink_to(tmp_path / "example")
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", curl], cwd=curl_dir, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert '"succeeded"' in run.stdout
        assert (curl_dir / "model.onnx").read_bytes()[:2] != b"{\""  # the model, not an error body
        assert Path(curl_dir / "model.onnx").stat().st_size > 1000
