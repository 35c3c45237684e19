"""The baselines bench.api measures the API beside: a bare FastAPI app answering a small job-like
JSON (a sync route, as ours are, so both pay for the thread pool), and a bare ASGI sink that reads
a request body and throws it away."""

from fastapi import FastAPI

app = FastAPI()

JOB = {"id": "job_0123456789abcdef", "model_id": "mdl_0123456789abcdef", "status": "succeeded", "stage": "succeeded",
       "progress": 1.0, "queue": "cpu", "attempts": 1, "created_at": "2026-12-01T12:00:00Z",
       "headline": {"size_ratio": 3.64, "speedup_batch_1": 2.73, "accuracy_drop": 0.003}}


@app.get("/job")
def job():
    return JOB


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


async def sink(scope, receive, send):
    if scope["type"] != "http":
        return
    received = 0
    more = True
    while more:
        message = await receive()
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = b'{"received": %d}' % received
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
