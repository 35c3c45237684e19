"""The webhook sender: a thread in every worker (the Celery worker's main process, the embedded
worker) that posts due deliveries from the outbox, signed per Standard Webhooks.

It never blocks a job: jobs only write outbox rows (service/webhooks/outbox.py), in the
transaction that ends them; this thread reads them on its own time. Several senders may run
(one per worker host): each attempt is claimed first (service/webhooks/deliveries.py). Each
attempt is bounded by `webhook_timeout_s`; a failure waits the next step of
`webhook_retry_schedule_s`. Redirects are not followed (a 3xx is a failure): a redirect must not
carry a delivery to an address the URL check would refuse.
"""

import logging
import threading

import httpx
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.webhooks import deliveries
from service.webhooks.urls import resolves_privately
from modelpress.webhooks import sign

log = logging.getLogger(__name__)

USER_AGENT = "modelpress-webhooks/1"
# A claim outlives the attempt it covers by this much, then another sender may take it.
LEASE_MARGIN_S = 60.0


class WebhookSender:
    def __init__(self, *, settings: Settings, session_factory: sessionmaker[Session]):
        self.settings, self.session_factory = settings, session_factory
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                                 headers={"user-agent": USER_AGENT})

    def start(self) -> None:
        if not self.settings.webhook_sender or self.thread is not None:
            return
        self.stopping.clear()
        self.thread = threading.Thread(target=self._loop, name="webhook-sender", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=self.settings.webhook_timeout_s + 5)
            self.thread = None

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sent = self.run_once()
            except Exception:  # the database away: try again at the next poll
                log.warning("webhook sender: poll failed", exc_info=True)
                sent = 0
            # A full batch means more are due: go on at once.
            if sent < self.settings.webhook_batch_size:
                self.stopping.wait(self.settings.webhook_poll_interval_s)

    def run_once(self) -> int:
        """Claim the due deliveries and make one attempt at each. Returns how many were attempted."""
        with self.session_factory() as session:
            claimed = deliveries.claim_due(session=session, limit=self.settings.webhook_batch_size,
                                           lease_s=self.settings.webhook_timeout_s + LEASE_MARGIN_S)
        for delivery in claimed:
            if self.stopping.is_set():
                break  # its claim expires and the next sender takes it
            status_code, error = self._post(delivery)
            with self.session_factory() as session:
                outcome = deliveries.record_attempt(session=session, claimed=delivery, status_code=status_code, error=error,
                                                    schedule=self.settings.webhook_retry_schedule_s)
            log.info("webhook delivery %s attempt %d: %s (%s)", delivery.id, delivery.attempt,
                     status_code or error, outcome)
        return len(claimed)

    def _post(self, delivery: deliveries.Claimed) -> tuple[int | None, str | None]:
        body = delivery.body.encode()
        try:
            if not self.settings.webhook_private_urls_allowed:
                private = resolves_privately(delivery.url)
                if private:
                    return None, f"refused: the host resolves to {private}, not a public address"
            headers = {"content-type": "application/json", **sign(delivery.secret, delivery.id, body)}
            # Streamed and closed unread: only the status matters, and a huge answer costs nothing.
            with self.http.stream("POST", delivery.url, content=body, headers=headers) as response:
                code = response.status_code
            return code, None if 200 <= code < 300 else f"HTTP {code}"
        except httpx.TimeoutException:
            return None, f"timed out after {self.settings.webhook_timeout_s} s"
        except (httpx.HTTPError, OSError) as exc:
            return None, f"{exc.__class__.__name__}: {exc}"[:500]
