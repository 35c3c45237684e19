"""Request-rate limiting per tenant, on the `limits` library: counters in Redis when the service
runs on several processes (production), in memory for the embedded default."""

import logging
import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger("modelpress")


class RequestLimiter:
    def __init__(self, storage_url: str):
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_url))

    def retry_after(self, *, tenant_id: str, per_minute: int) -> int | None:
        """Count one request; None when it is allowed, else the seconds until one will be."""
        item = RateLimitItemPerMinute(per_minute)
        try:
            if self._limiter.hit(item, "tenant", tenant_id):
                return None
            reset_at = self._limiter.get_window_stats(item, "tenant", tenant_id).reset_time
        except Exception as exc:  # the limiter's store being down must not take the API down with it
            log.warning("rate limiter unavailable, request let through: %s", exc.__class__.__name__)
            return None
        return max(1, math.ceil(reset_at - time.time()))
