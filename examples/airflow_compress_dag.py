"""An Airflow DAG step that compresses a freshly trained model with the modelpress CLI.

The task fails (and Airflow retries or alerts) when the CLI exits non-zero: 1 job failed,
2 usage error, 3 accuracy guard not met or a --gate did not hold, 4 server unreachable.
`MODELPRESS_URL` and `MODELPRESS_API_KEY` come from the worker's environment or an Airflow
connection. The gates' JUnit report lies beside the compressed model (gate.xml).
"""

from datetime import datetime

from airflow import DAG
from airflow.operators.bash import BashOperator

with DAG(dag_id="compress_model", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    compress = BashOperator(
        task_id="compress",
        bash_command=(
            "modelpress compress {{ params.model }} --method static_int8 "
            "--calibration {{ params.calibration }} --eval {{ params.eval }} "
            "--gate '{{ params.gate }}' --junit {{ params.output }}/{{ run_id }}/gate.xml "
            "--output {{ params.output }}/{{ run_id }} --json"
        ),
        params={"model": "/data/models/resnet.onnx", "calibration": "/data/calib.npz", "eval": "/data/eval.npz",
                "output": "/data/compressed", "gate": "top1_drop<=0.5,speedup_b32>=1.5,size_ratio>=3"},
        # The JSON summary (job, metrics, downloaded files) goes to XCom for the next task.
        do_xcom_push=True,
    )


def compress_with_the_client(model_path: str, calibration: str, output_dir: str,
                             gates: str = "size_ratio>=3") -> dict:
    """The same from a PythonOperator, with the client: raises GuardNotMet / JobFailed on failure,
    and RuntimeError naming the gates that did not hold."""
    from modelpress import Client, gate

    conditions = gate.parse(gates)  # a typo fails the task before anything is uploaded
    with Client() as client:
        job = client.submit(client.upload_model(model_path), [{"type": "quantize", "params": {"method": "static_int8"}}],
                            data={"calibration": client.upload_dataset(calibration)})
        job.wait(timeout=3600, progress=False)
        failed = [result.message for result in gate.evaluate(conditions, job.metrics) if not result.passed]
        if failed:
            raise RuntimeError("gate failed: " + "; ".join(failed))
        job.download("model.onnx", to=output_dir)
        return job.metrics["comparison"]
