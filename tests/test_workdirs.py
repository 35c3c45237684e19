"""Work folders left by killed runs are removed; a live run's folder is kept (issue 17: killed runs
left 18 folders, 22 MB, in data/tmp)."""

import time

from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.test_runner import wait_step  # noqa: F401  (fixture)
from worker.workdirs import remove_dead_workdirs


def test_dead_run_folders_go_and_the_live_one_stays(client, reference, wait_step):  # noqa: F811
    context = client.app.state.context
    tmp_dir = context.settings.tmp_dir
    model = upload_model(client, reference.onnx)
    data = upload_dataset(client, reference.calib_npz)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "wait", "params": {"seconds": 600}}],
                                         "data": {"eval": data["id"]}}).json()
    deadline = time.monotonic() + 30
    while not wait_step and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wait_step, "the wait step never started"
    live = [p for p in tmp_dir.iterdir() if p.name.startswith(f"{job['id']}-")]
    assert len(live) == 1 and live[0].is_dir()
    (live[0] / "work.bin").write_bytes(b"x" * 1000)
    # What killed runs leave: an earlier delivery of the same job, a job that no longer exists.
    dead = [tmp_dir / f"{job['id']}-0123abcd-old", tmp_dir / "job_00000000000000000000000000000000-feed-x"]
    for folder in dead:
        folder.mkdir()
        (folder / "leftover.onnx").write_bytes(b"y" * 1000)
    unrelated = tmp_dir / "upload-123"
    unrelated.write_bytes(b"z")

    assert remove_dead_workdirs(session_factory=context.session_factory, tmp_dir=tmp_dir) == 2
    assert not any(folder.exists() for folder in dead)
    assert (live[0] / "work.bin").exists() and unrelated.exists()

    client.post(f"/v1/jobs/{job['id']}/cancel")
    finished, _ = wait_finished(client, job["id"], timeout=180)
    assert finished["status"] == "cancelled"
    assert not live[0].exists()  # a run cleans its own folder when it ends
