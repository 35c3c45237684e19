"""On S3, artifact downloads may go straight from the bucket: the API answers 307 to a presigned
URL (MODELPRESS_DOWNLOAD_REDIRECT_S), the client follows it without sending its key to S3, and
checks the sha256 as before. The report stays on the API (it keeps its CSP)."""

import hashlib

import httpx

from modelpress import Client
from tests.stack import S3_ENV, embedded_server


def test_downloads_redirect_to_a_presigned_url_and_the_client_follows(tmp_path, s3_endpoint, s3_bucket, reference):
    env = {**S3_ENV, "STORAGE_URL": f"s3://{s3_bucket}/objects", "S3_ENDPOINT_URL": s3_endpoint,
           "MODELPRESS_DOWNLOAD_REDIRECT_S": "300"}
    with embedded_server(tmp_path / "data", env) as (url, _):
        with Client(url) as client:
            model = client.upload_model(reference.onnx)
            data = client.upload_dataset(reference.eval_npz)
            job = client.submit(model, [{"type": "quantize", "params": {"method": "dynamic_int8"}}], data={"eval": data.id})
            job.wait(timeout=600, progress=False)
            assert job.status == "succeeded"
            path = job.download("model.onnx", to=tmp_path / "out/")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == job.artifacts["model.onnx"]["sha256"]

        answer = httpx.get(f"{url}{job.artifacts['model.onnx']['url']}", follow_redirects=False)
        assert answer.status_code == 307 and answer.content == b""
        location = answer.headers["location"]
        assert location.startswith(s3_endpoint) and "Signature=" in location and "Expires=" in location
        assert answer.headers["x-checksum-sha256"] == job.artifacts["model.onnx"]["sha256"]
        # The presigned URL alone (no key, no API) gets the bytes, as an attachment.
        direct = httpx.get(location)
        assert direct.status_code == 200 and hashlib.sha256(direct.content).hexdigest() == answer.headers["x-checksum-sha256"]
        assert 'filename="model.onnx"' in direct.headers["content-disposition"]
        # The report is streamed by the API with its CSP, never redirected.
        report = httpx.get(f"{url}{job.artifacts['report.html']['url']}", follow_redirects=False)
        assert report.status_code == 200 and "content-security-policy" in report.headers
