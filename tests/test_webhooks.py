"""Webhooks: a real HTTP receiver (http.server on a free port) gets signed deliveries from the
real sender thread of the embedded worker; the outbox is written with the job's final state;
retries back off; a delivery made while no sender ran goes out when one starts; tenants see only
their own endpoints. `modelpress.webhooks.verify` on its own."""

import base64
import ipaddress
import json
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from modelpress.webhooks import WebhookVerificationError, new_secret, sign, verify
from service.config import Settings
from tests.jobs_flow import upload_dataset, upload_model, wait_finished
from tests.processes import wait_for
from tests.tenancy import add_tenant, keyed_client, keyed_settings, problem_code
from tests.test_models_api import assert_problem
from worker.serve import create_app

QUICK_STEPS = [{"type": "quantize", "params": {"method": "dynamic_int8"}}]
FAST = {"webhook_poll_interval_s": 0.1, "webhook_timeout_s": 5.0}


class Receiver:
    """A webhook endpoint: records every request (arrival time, headers, body) and answers the
    given statuses in turn, then 204."""

    def __init__(self, answers=()):
        self.answers, self.requests, self.lock = list(answers), [], threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append((time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.answers.pop(0) if receiver.answers else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/modelpress"

    def received(self, count: int, timeout: float = 120.0) -> list:
        wait_for(lambda: len(self.requests) >= count, timeout, f"{count} webhook request(s) at {self.url}")
        with self.lock:
            return list(self.requests)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def embedded(settings: Settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def fast_settings(tmp_path, **overrides) -> Settings:
    return Settings(data_dir=tmp_path / "data", **{**FAST, **overrides})


def run_quick_job(http, reference) -> dict:
    model, data = upload_model(http, reference.onnx), upload_dataset(http, reference.calib_npz)
    response = http.post("/v1/jobs", json={"model_id": model["id"], "steps": QUICK_STEPS, "data": {"calibration": data["id"]}})
    assert response.status_code == 202, response.text
    job, _ = wait_finished(http, response.json()["id"])
    return job


def deliveries(http, webhook_id) -> list[dict]:
    response = http.get(f"/v1/webhooks/{webhook_id}/deliveries")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def settled(http, webhook_id, count=1, timeout=120.0) -> list[dict]:
    """The endpoint's deliveries once `count` of them are no longer pending or being sent."""
    def done():
        items = deliveries(http, webhook_id)
        finished = [d for d in items if d["status"] in ("succeeded", "failed")]
        return items if len(finished) >= count else None
    return wait_for(done, timeout, f"{count} settled deliveries of {webhook_id}")


# --- verify, on its own ------------------------------------------------------------------------

BODY = json.dumps({"type": "job.succeeded", "data": {"job": {"id": "job_1"}}}).encode()


def test_verify_accepts_a_good_signature_and_returns_the_event():
    secret = new_secret()
    headers = sign(secret, "msg_1", BODY)
    assert verify(BODY, headers, secret)["data"]["job"]["id"] == "job_1"
    # Header names in any case (frameworks differ), and a second signature during a key rotation.
    shouted = {k.upper(): v for k, v in headers.items()}
    shouted["WEBHOOK-SIGNATURE"] = f"v1,{base64.b64encode(b'x' * 32).decode()} {headers['webhook-signature']}"
    assert verify(BODY, shouted, secret)["type"] == "job.succeeded"


def test_verify_matches_the_standard_webhooks_example():
    # The example of the Standard Webhooks specification (and of its reference libraries).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
    assert verify(body, headers, secret, now=1614265330 + 10) == {"test": 2432232314}


@pytest.mark.parametrize("tamper", ["body", "secret", "id", "old", "future", "missing", "version"])
def test_verify_refuses(tamper):
    secret = new_secret()
    now = time.time()
    timestamp = int(now) - (6 * 60 if tamper == "old" else -6 * 60 if tamper == "future" else 0)
    headers = sign(secret, "msg_1", BODY, timestamp=timestamp)
    body = BODY
    if tamper == "body":
        body = BODY.replace(b"job_1", b"job_2")
    elif tamper == "secret":
        secret = new_secret()
    elif tamper == "id":
        headers["webhook-id"] = "msg_2"
    elif tamper == "missing":
        del headers["webhook-signature"]
    elif tamper == "version":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    with pytest.raises(WebhookVerificationError) as caught:
        verify(body, headers, secret, now=now)
    expected = {"old": "from now", "future": "from now", "missing": "missing header"}.get(tamper, "no webhook-signature matches")
    assert expected in str(caught.value)


# --- delivery end to end (embedded: SQLite, in-process worker and sender) -----------------------

def test_a_finished_job_is_delivered_signed_once_per_attempt(tmp_path, reference):
    with Receiver() as receiver, embedded(fast_settings(tmp_path)) as http:
        created = http.post("/v1/webhooks", json={"url": receiver.url, "description": "ci"})
        assert created.status_code == 201, created.text
        hook = created.json()
        assert hook["secret"].startswith("whsec_") and hook["event_types"] == ["job.cancelled", "job.failed", "job.succeeded"]
        # The secret is shown once: no read shows it again.
        assert "secret" not in http.get(f"/v1/webhooks/{hook['id']}").json()
        assert hook["secret"] not in http.get("/v1/webhooks").text
        only_failures = http.post("/v1/webhooks", json={"url": receiver.url + "/failures", "event_types": ["job.failed"]}).json()

        job = run_quick_job(http, reference)
        assert job["status"] == "succeeded", job["error"]
        (delivery,) = settled(http, hook["id"])
        (arrived, headers, body), = receiver.received(1)
        event = verify(body, headers, hook["secret"])
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job["id"]
        assert event["data"]["status"] == "succeeded" and event["data"]["headline"] == job["headline"]
        assert headers["webhook-id"] == delivery["id"] and headers["content-type"] == "application/json"
        assert delivery["status"] == "succeeded" and delivery["attempts"] == 1 and delivery["last_status_code"] == 204
        assert delivery["event_type"] == "job.succeeded" and delivery["job_id"] == job["id"]
        # Nothing for the endpoint that wants failures only, and no second post of the delivery.
        assert deliveries(http, only_failures["id"]) == []
        time.sleep(1.0)
        assert len(receiver.requests) == 1

        # Re-sent by hand: the same message id, signed afresh, one more attempt recorded.
        resent = http.post(f"/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/resend")
        assert resent.status_code == 202, resent.text
        wait_for(lambda: deliveries(http, hook["id"])[0]["attempts"] == 2, 60, "the re-sent attempt")
        (_, first, _), (_, again, again_body) = receiver.received(2)
        assert again["webhook-id"] == first["webhook-id"] == delivery["id"]
        assert verify(again_body, again, hook["secret"])["data"]["id"] == job["id"]
        assert len(receiver.requests) == 2

        # Removed: its deliveries go with it, and the next job posts nothing.
        assert http.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
        assert_problem(http.get(f"/v1/webhooks/{hook['id']}/deliveries"), 404, "webhook_not_found")
        run_quick_job(http, reference)
        time.sleep(1.0)
        assert len(receiver.requests) == 2


def test_progress_events_only_for_endpoints_that_ask(tmp_path, reference):
    with Receiver() as receiver, embedded(fast_settings(tmp_path)) as http:
        secret = new_secret()
        hook = http.post("/v1/webhooks", json={"url": receiver.url, "secret": secret,
                                               "event_types": ["job.progress", "job.succeeded"]}).json()
        assert "secret" in hook and hook["secret"] == secret
        job = run_quick_job(http, reference)
        items = wait_for(lambda: (lambda d: d if d and all(x["status"] == "succeeded" for x in d)
                                  and any(x["event_type"] == "job.succeeded" for x in d) else None)(deliveries(http, hook["id"])),
                         120, "every delivery sent")
        events = [verify(body, headers, secret) for _, headers, body in receiver.received(len(items))]
        stages = [e["data"]["stage"] for e in events if e["type"] == "job.progress"]
        assert len(stages) >= 3 and len(stages) == len(set(stages)), stages  # one per new stage
        assert [e["type"] for e in events].count("job.succeeded") == 1
        assert all(e["data"]["id"] == job["id"] for e in events)


def test_a_failing_receiver_gets_retries_with_growing_waits(tmp_path, reference):
    schedule = [1.5, 3.0]
    with Receiver(answers=[500, 503]) as receiver, embedded(fast_settings(tmp_path, webhook_retry_schedule_s=schedule)) as http:
        hook = http.post("/v1/webhooks", json={"url": receiver.url}).json()
        job = run_quick_job(http, reference)
        seen = []

        def delivered():
            (item,) = deliveries(http, hook["id"])
            seen.append(item)
            return item if item["status"] == "succeeded" else None

        final = wait_for(delivered, 120, "the delivery after two failures", interval=0.1)
        requests = receiver.received(3)
        assert len(requests) == 3 and final["attempts"] == 3 and final["last_status_code"] == 204
        assert len({headers["webhook-id"] for _, headers, _ in requests}) == 1
        assert all(verify(body, headers, hook["secret"])["data"]["id"] == job["id"] for _, headers, body in requests)
        # Each wait at least the schedule's (a lower bound holds however loaded the machine is).
        (t1, _, _), (t2, _, _), (t3, _, _) = requests
        assert t2 - t1 >= schedule[0] - 0.05 and t3 - t2 >= schedule[1] - 0.05, (t2 - t1, t3 - t2)
        # Every pending state observed carried the last failure and the wait the schedule gives it.
        for item in seen:
            if item["status"] == "pending" and item["attempts"]:
                assert item["last_status_code"] in (500, 503) and item["last_error"].startswith("HTTP 50")
                from datetime import datetime
                wait = datetime.fromisoformat(item["next_attempt_at"]) - datetime.fromisoformat(item["last_attempt_at"])
                assert wait == timedelta(seconds=schedule[item["attempts"] - 1]), item


def test_a_delivery_fails_when_the_schedule_is_used_up(tmp_path, reference):
    with Receiver(answers=[500] * 10) as receiver, embedded(fast_settings(tmp_path, webhook_retry_schedule_s=[0.2])) as http:
        hook = http.post("/v1/webhooks", json={"url": receiver.url}).json()
        run_quick_job(http, reference)
        (delivery,) = settled(http, hook["id"])
        assert delivery["status"] == "failed" and delivery["attempts"] == 2 and delivery["next_attempt_at"] is None
        time.sleep(1.0)
        assert len(receiver.requests) == 2
        # A re-send starts the schedule again.
        assert http.post(f"/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/resend").status_code == 202
        receiver.answers.clear()
        wait_for(lambda: deliveries(http, hook["id"])[0]["status"] == "succeeded", 60, "the re-sent delivery")
        assert len(receiver.requests) == 3


def test_an_unreachable_receiver_is_retried(tmp_path, reference):
    """Connection refused is a failed attempt like a 500: recorded, retried."""
    with Receiver() as receiver:
        url = receiver.url
    with embedded(fast_settings(tmp_path, webhook_retry_schedule_s=[30])) as http:
        hook = http.post("/v1/webhooks", json={"url": url}).json()
        run_quick_job(http, reference)
        item = wait_for(lambda: (lambda d: d[0] if d and d[0]["attempts"] == 1 and d[0]["status"] == "pending" else None)(
            deliveries(http, hook["id"])), 120, "the first failed attempt")
        assert item["last_status_code"] is None and "Connect" in item["last_error"]


def test_a_job_that_finished_while_no_sender_ran_is_announced_when_one_starts(tmp_path, reference):
    with Receiver() as receiver:
        with embedded(fast_settings(tmp_path, webhook_sender=False)) as http:
            hook = http.post("/v1/webhooks", json={"url": receiver.url}).json()
            job = run_quick_job(http, reference)
            (waiting,) = deliveries(http, hook["id"])
            assert waiting["status"] == "pending" and waiting["attempts"] == 0
            time.sleep(1.0)
            assert receiver.requests == []
        # A new process on the same database, with its sender.
        with embedded(fast_settings(tmp_path)) as http:
            (delivered,) = settled(http, hook["id"])
            (_, headers, body), = receiver.received(1)
            assert verify(body, headers, hook["secret"])["data"]["id"] == job["id"]
            assert delivered["id"] == waiting["id"] and delivered["status"] == "succeeded" and delivered["attempts"] == 1


# --- the outbox is written with the state change -------------------------------------------------

def _queued_job(session, tenant_id="default"):
    from service.jobs.tables import JobRow

    job = JobRow(id=f"job_{uuid.uuid4().hex}", tenant_id=tenant_id, model_id="mdl_x", status="queued", stage="queued",
                 progress=0.0, spec={"steps": [], "data": {}}, metrics={})
    session.add(job)
    session.commit()
    return job.id


def test_cancel_of_a_queued_job_writes_its_delivery(tmp_path):
    from service.db import make_engine, make_session_factory

    settings = fast_settings(tmp_path, webhook_sender=False)
    with embedded(settings) as http:
        hook = http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/never", "event_types": ["job.cancelled"]}).json()
        engine = make_engine(settings.effective_database_url)
        with make_session_factory(engine)() as session:
            job_id = _queued_job(session)
        assert http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        (delivery,) = deliveries(http, hook["id"])
        assert delivery["event_type"] == "job.cancelled" and delivery["job_id"] == job_id
        engine.dispose()


def test_a_rolled_back_state_change_leaves_no_delivery(tmp_path):
    from sqlalchemy import func, select

    from service.db import make_engine, make_session_factory
    from service.jobs.states import JobStatus, transition
    from service.webhooks.tables import WebhookDeliveryRow

    settings = fast_settings(tmp_path, webhook_sender=False)
    with embedded(settings) as http:
        http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/never"})
        engine = make_engine(settings.effective_database_url)
        with make_session_factory(engine)() as session:
            job_id = _queued_job(session)
            assert transition(session, job_id, JobStatus.QUEUED, JobStatus.FAILED, error_code="broker_unavailable")
            assert session.scalar(select(func.count()).select_from(WebhookDeliveryRow)) == 1  # in the transaction
            session.rollback()
            assert session.scalar(select(func.count()).select_from(WebhookDeliveryRow)) == 0
            assert transition(session, job_id, JobStatus.QUEUED, JobStatus.FAILED, error_code="broker_unavailable")
            session.commit()
            assert session.scalar(select(func.count()).select_from(WebhookDeliveryRow)) == 1
            # A job that is already finished does not move, and is not announced again.
            assert not transition(session, job_id, JobStatus.QUEUED, JobStatus.CANCELLED)
            session.commit()
            assert session.scalar(select(func.count()).select_from(WebhookDeliveryRow)) == 1
        engine.dispose()


def test_two_senders_never_post_the_same_attempt(tmp_path):
    """Claims are exclusive: two senders polling one outbox together post each delivery once."""
    from service.db import make_engine, make_session_factory
    from worker.webhooks import WebhookSender

    settings = fast_settings(tmp_path, webhook_sender=False)
    with Receiver() as receiver, embedded(settings) as http:
        hook = http.post("/v1/webhooks", json={"url": receiver.url}).json()
        engine = make_engine(settings.effective_database_url)
        factory = make_session_factory(engine)
        with factory() as session:
            from service.jobs.states import JobStatus, transition
            for _ in range(12):
                transition(session, _queued_job(session), JobStatus.QUEUED, JobStatus.CANCELLED)
                session.commit()
        senders = [WebhookSender(settings=settings.model_copy(update={"webhook_sender": True}), session_factory=factory)
                   for _ in range(2)]
        for sender in senders:
            sender.start()
        try:
            settled(http, hook["id"], count=12)
        finally:
            for sender in senders:
                sender.stop()
        ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
        assert len(ids) == 12 and len(set(ids)) == 12
        assert all(d["attempts"] == 1 for d in deliveries(http, hook["id"]))
        engine.dispose()


# --- input, limits, tenants -------------------------------------------------------------------------

def test_bad_webhook_input(tmp_path):
    with embedded(fast_settings(tmp_path, webhook_max_endpoints=2)) as http:
        def post(**body):
            return http.post("/v1/webhooks", json={"url": "https://hooks.example.com/x", **body})

        for url in ("ftp://hooks.example.com/x", "https:///nohost", "hooks.example.com/x", "https://user:pw@hooks.example.com/",
                    "https://hooks.example.com/" + "a" * 2048, "https://hooks.example.com/a b", "http://hooks.example.com:port/"):
            assert_problem(post(url=url), 422, "invalid_webhook_url")
        for secret in ("not-a-secret", "whsec_" + base64.b64encode(b"short").decode(), "whsec_%%%"):
            assert_problem(post(secret=secret), 422, "invalid_webhook_secret")
        assert_problem(post(event_types=["job.exploded"]), 422, "validation_error")
        assert_problem(post(event_types=[]), 422, "validation_error")
        assert post().status_code == 201 and post().status_code == 201
        assert_problem(post(), 403, "webhook_limit_reached")
        assert_problem(http.get("/v1/webhooks/whk_nope"), 404, "webhook_not_found")
        hook_id = http.get("/v1/webhooks").json()["items"][0]["id"]
        assert_problem(http.get(f"/v1/webhooks/{hook_id}/deliveries/msg_nope"), 404, "delivery_not_found")
        assert_problem(http.post(f"/v1/webhooks/{hook_id}/deliveries/msg_nope/resend"), 404, "delivery_not_found")


def test_a_delivery_being_sent_is_not_resent(tmp_path):
    from service.db import make_engine, make_session_factory
    from service.webhooks.tables import WebhookDeliveryRow

    settings = fast_settings(tmp_path, webhook_sender=False)
    with embedded(settings) as http:
        hook = http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/never"}).json()
        engine = make_engine(settings.effective_database_url)
        with make_session_factory(engine)() as session:
            from service.jobs.states import JobStatus, transition
            transition(session, _queued_job(session), JobStatus.QUEUED, JobStatus.CANCELLED)
            session.commit()
            (row,) = session.query(WebhookDeliveryRow).all()
            row.status = "sending"  # as a sender's claim leaves it
            session.commit()
        assert_problem(http.post(f"/v1/webhooks/{hook['id']}/deliveries/{row.id}/resend"), 409, "delivery_in_progress")
        engine.dispose()


def test_private_addresses_are_refused_where_keys_are_required(tmp_path):
    settings = keyed_settings(tmp_path)
    tenant = add_tenant(settings, "acme")
    with keyed_client(settings) as http:
        for url in ("http://127.0.0.1:8080/x", "http://169.254.169.254/latest/meta-data", "http://localhost/x",
                    "http://[::1]/x", "http://10.1.2.3/x", "http://[::ffff:127.0.0.1]/x"):
            assert_problem(http.post("/v1/webhooks", json={"url": url}, headers=tenant.headers()), 422, "webhook_url_refused")
        assert http.post("/v1/webhooks", json={"url": "https://hooks.example.com/x"}, headers=tenant.headers()).status_code == 201
        # The read scope reads; registering takes write.
        assert problem_code(http.post("/v1/webhooks", json={"url": "https://hooks.example.com/y"},
                                      headers=tenant.headers("read"))) == "insufficient_scope"
        assert http.get("/v1/webhooks", headers=tenant.headers("read")).status_code == 200


def test_the_sender_refuses_a_name_that_resolves_privately(tmp_path):
    """Checked again at send time: a public-looking name that resolves to loopback is not posted."""
    from service.db import make_engine, make_session_factory
    from service.webhooks.deliveries import claim_due
    from worker.webhooks import WebhookSender

    settings = keyed_settings(tmp_path, webhook_sender=False, **FAST)
    tenant = add_tenant(settings, "acme")
    with Receiver() as receiver, keyed_client(settings) as http:
        port = receiver.server.server_address[1]
        # The machine's own name: no address in the URL, but it resolves to this host.
        name = socket.gethostname()
        try:
            addresses = {a[4][0] for a in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
        except OSError:
            pytest.skip(f"this machine's name {name} does not resolve")
        if all(ipaddress.ip_address(a).is_global for a in addresses):
            pytest.skip(f"this machine's name resolves to public addresses {addresses}")
        hook = http.post("/v1/webhooks", json={"url": f"http://{name}:{port}/x"}, headers=tenant.headers()).json()
        assert "id" in hook, hook
        engine = make_engine(settings.effective_database_url)
        factory = make_session_factory(engine)
        with factory() as session:
            from service.jobs.states import JobStatus, transition
            transition(session, _queued_job(session, tenant.id), JobStatus.QUEUED, JobStatus.CANCELLED)
            session.commit()
        sender = WebhookSender(settings=settings, session_factory=factory)
        assert sender.run_once() == 1
        (delivery,) = deliveries_as(http, tenant, hook["id"])
        assert delivery["status"] == "pending" and delivery["last_error"].startswith("refused: the host resolves to ")
        assert receiver.requests == []
        with factory() as session:
            assert claim_due(session=session, limit=10, lease_s=60) == []  # waiting for its retry
        engine.dispose()


def deliveries_as(http, tenant, webhook_id):
    return http.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=tenant.headers()).json()["items"]


def test_tenants_see_and_hear_only_their_own(tmp_path, reference):
    settings = keyed_settings(tmp_path, webhook_allow_private_urls=True, **FAST)
    a, b = add_tenant(settings, "acme"), add_tenant(settings, "globex")
    with Receiver() as to_a, Receiver() as to_b, keyed_client(settings) as http:
        class As:
            def __init__(self, tenant):
                self.tenant = tenant

            def get(self, url, **kw):
                return http.get(url, headers=self.tenant.headers(), **kw)

            def post(self, url, **kw):
                return http.post(url, headers=self.tenant.headers(), **kw)

            def delete(self, url, **kw):
                return http.delete(url, headers=self.tenant.headers(), **kw)

        as_a, as_b = As(a), As(b)
        hook_a = as_a.post("/v1/webhooks", json={"url": to_a.url}).json()
        hook_b = as_b.post("/v1/webhooks", json={"url": to_b.url}).json()
        job = run_quick_job(as_a, reference)
        (delivery_a,) = settled(as_a, hook_a["id"])
        to_a.received(1)
        time.sleep(1.0)
        assert to_b.requests == [] and deliveries(as_b, hook_b["id"]) == []

        listed = as_b.get("/v1/webhooks").json()["items"]
        assert [h["id"] for h in listed] == [hook_b["id"]]
        unknown = f"whk_{uuid.uuid4().hex}"
        for method, path in (("get", "/v1/webhooks/{}"), ("delete", "/v1/webhooks/{}"), ("get", "/v1/webhooks/{}/deliveries"),
                             ("get", "/v1/webhooks/{}/deliveries/" + delivery_a["id"]),
                             ("post", "/v1/webhooks/{}/deliveries/" + delivery_a["id"] + "/resend")):
            foreign = getattr(as_b, method)(path.format(hook_a["id"]))
            missing = getattr(as_b, method)(path.format(unknown))
            assert foreign.status_code == missing.status_code == 404, (path, foreign.text)
            assert foreign.text.replace(hook_a["id"], "ID") == missing.text.replace(unknown, "ID")
        # B's own endpoint with A's delivery id: still missing.
        assert_problem(as_b.get(f"/v1/webhooks/{hook_b['id']}/deliveries/{delivery_a['id']}"), 404, "delivery_not_found")
        assert_problem(as_b.post(f"/v1/webhooks/{hook_b['id']}/deliveries/{delivery_a['id']}/resend"), 404, "delivery_not_found")
        assert as_a.get(f"/v1/webhooks/{hook_a['id']}").status_code == 200
        assert len(to_a.requests) == 1 and job["status"] == "succeeded"
        actions = [e["action"] for e in http.get("/v1/admin/audit", headers=a.headers("admin")).json()["items"]]
        assert "webhook.created" in actions


# --- the production shape: API under uvicorn, a Celery worker's sender, PostgreSQL, Redis, S3 -------

@pytest.fixture(scope="module")
def stack(request):
    from tests.stack import stack_client

    with stack_client(request, f"modelpress-hooks-{uuid.uuid4().hex[:8]}") as (http, worker, api):
        yield http, worker, api


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_on_the_production_stack_the_celery_worker_sends_and_catches_up(stack, reference):
    from tests.stack import own_worker

    http, template, _ = stack
    with Receiver() as receiver:
        hook = http.post("/v1/webhooks", json={"url": receiver.url}).json()
        try:
            with own_worker(template, "hooks-worker-1"):
                job = run_quick_job(http, reference)
                assert job["status"] == "succeeded", job["error"]
                (_, headers, body), = receiver.received(1)
                assert verify(body, headers, hook["secret"]) ["data"]["id"] == job["id"]
                (delivery,) = settled(http, hook["id"])
                assert delivery["status"] == "succeeded" and delivery["attempts"] == 1
            # No worker, so no sender: a queued job cancelled through the API is written to the
            # outbox by the API process, and sent once a worker runs again.
            model, data = upload_model(http, reference.onnx), upload_dataset(http, reference.calib_npz)
            queued = http.post("/v1/jobs", json={"model_id": model["id"], "steps": QUICK_STEPS,
                                                 "data": {"calibration": data["id"]}}).json()
            assert http.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
            time.sleep(1.0)
            assert len(receiver.requests) == 1
            waiting = next(d for d in deliveries(http, hook["id"]) if d["job_id"] == queued["id"])
            assert waiting["status"] == "pending" and waiting["attempts"] == 0
            with own_worker(template, "hooks-worker-2"):
                _, (_, headers, body) = receiver.received(2)
                event = verify(body, headers, hook["secret"])
                assert event["type"] == "job.cancelled" and event["data"]["id"] == queued["id"]
                settled(http, hook["id"], count=2)
            assert len(receiver.requests) == 2
        finally:
            http.delete(f"/v1/webhooks/{hook['id']}")
