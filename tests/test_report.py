"""report.html: self-contained, and it renders in a real headless browser with the job's numbers."""

import re
import subprocess

from tests.jobs_flow import submit, upload_dataset, upload_model, wait_finished

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args, profile) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=600)


def test_report_renders_in_chromium_with_the_numbers(client, reference, tmp_path):
    model = upload_model(client, reference.onnx)
    data = upload_dataset(client, reference.eval_npz)
    job, _ = wait_finished(client, submit(client, model["id"], data["id"], data["id"])["id"])
    assert job["status"] == "succeeded"
    report = tmp_path / "report.html"
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/report.html")
    report.write_bytes(response.content)
    html = report.read_text()

    # Self-contained: no scripts, stylesheets or fonts fetched from anywhere; the example images
    # (one <img> each) are inline PNG data URIs.
    assert not re.search(r"<(script|link|iframe)\b", html, re.I)
    assert "url(" not in html and "@import" not in html
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html, re.I)
    assert len(sources) == len(re.findall(r"<img\b", html, re.I)) == len(job["metrics"]["examples"]["images"]) > 0
    assert all(source.startswith("data:image/png;base64,") for source in sources)

    rendered = chromium("--dump-dom", report.as_uri(), profile=tmp_path / "profile")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = rendered.stdout
    metrics = job["metrics"]
    assert job["id"] in dom
    assert f"{metrics['original']['size_bytes']:,d}" in dom and f"{metrics['compressed']['size_bytes']:,d}" in dom
    assert f"{metrics['comparison']['size_ratio']:.2f}x smaller" in dom
    assert f"{metrics['compressed']['accuracy']['top1']:,.3f}" in dom
    assert dom.count("<svg") == 4  # size, latency b1, latency b32, accuracy
    assert 'id="layers"' in dom and metrics["layers"][0]["layer"] in dom

    screenshot = tmp_path / "report.png"
    shot = chromium(f"--screenshot={screenshot}", "--window-size=1200,1600", report.as_uri(), profile=tmp_path / "profile2")
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000
