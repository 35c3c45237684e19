"""A real job's metrics carry the task it judged the model as (inferred, with the reason) and the
task's label-free fidelity, consistent with the per-output fidelity computed beside it."""

from tests.examples_check import embedded_images
from tests.jobs_flow import submit, upload_dataset, upload_model, wait_finished


def test_classifier_job_reports_inferred_task_and_its_fidelity(client, reference):
    model = upload_model(client, reference.onnx)
    data = upload_dataset(client, reference.calib_npz)
    job, _ = wait_finished(client, submit(client, model["id"], data["id"], data["id"])["id"])
    assert job["status"] == "succeeded", job["error"]
    comparison = job["metrics"]["comparison"]
    task = comparison["task"]
    assert task["task"]["type"] == "classification" and task["inferred"] and "(N, C)" in task["reason"]
    assert task["fidelity"]["top1_agreement"] == comparison["fidelity"][0]["top1_agreement"]
    assert task["floor_shortfalls"] == [] or task["fidelity"]["top1_agreement"] < 0.99
    # The report shows the images whose top-1 changed first, each with both models' top-1.
    changed = [e["original"]["class"] != e["compressed"]["class"] for e, _ in embedded_images(client, job)]
    assert changed == sorted(changed, reverse=True) and changed[0] == (task["fidelity"]["top1_agreement"] < 1)
