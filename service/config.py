"""All settings in one validated object, read from the environment by `get_settings()`.

Nothing reads environment variables anywhere else: tests build a `Settings` and hand it in.
"""

import importlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.sandbox import Limits

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    data_dir: Path = Field(Path("data"), validation_alias=AliasChoices("MODELPRESS_DATA_DIR", "data_dir"))
    # Empty means the embedded default: SQLite in data_dir.
    database_url: str = Field("", validation_alias=AliasChoices("DATABASE_URL", "database_url"))
    # Empty means no broker: jobs run on a worker thread inside the API process.
    broker_url: str = Field("", validation_alias=AliasChoices("BROKER_URL", "broker_url"))
    # Prepended to every broker key (Redis), so deployments (or test stacks) sharing one Redis never
    # take each other's tasks. The API and its workers must use the same prefix.
    broker_key_prefix: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$",
                                   validation_alias=AliasChoices("MODELPRESS_BROKER_PREFIX", "broker_key_prefix"))
    # "s3://bucket[/prefix]" or a folder; empty means data_dir/objects.
    storage_url: str = Field("", validation_alias=AliasChoices("STORAGE_URL", "storage_url"))
    s3_endpoint_url: str = Field("", validation_alias=AliasChoices("S3_ENDPOINT_URL", "s3_endpoint_url"))
    s3_region: str = Field("us-east-1", validation_alias=AliasChoices("S3_REGION", "s3_region"))

    max_model_bytes: int = Field(
        1024 * MiB, gt=0, validation_alias=AliasChoices("MODELPRESS_MAX_MODEL_BYTES", "max_model_bytes")
    )
    max_dataset_bytes: int = Field(
        2048 * MiB, gt=0, validation_alias=AliasChoices("MODELPRESS_MAX_DATASET_BYTES", "max_dataset_bytes")
    )
    # Upload sessions (service/upload_sessions): parts up to the size below, resumable, then one
    # file through the same checks as a single-request upload. Far above the single-request limits:
    # a cut connection costs one part, not the whole file.
    upload_session_max_bytes: int = Field(
        4096 * MiB, gt=0, validation_alias=AliasChoices("MODELPRESS_UPLOAD_SESSION_MAX_BYTES", "upload_session_max_bytes"))
    upload_part_bytes: int = Field(
        16 * MiB, gt=0, validation_alias=AliasChoices("MODELPRESS_UPLOAD_PART_BYTES", "upload_part_bytes"))
    # The part sizes a client may ask for (a smaller part resumes sooner, a larger one costs fewer requests).
    upload_min_part_bytes: int = Field(
        1 * MiB, gt=0, validation_alias=AliasChoices("MODELPRESS_UPLOAD_MIN_PART_BYTES", "upload_min_part_bytes"))
    upload_max_part_bytes: int = Field(
        128 * MiB, gt=0, validation_alias=AliasChoices("MODELPRESS_UPLOAD_MAX_PART_BYTES", "upload_max_part_bytes"))
    upload_max_parts: int = Field(
        10_000, gt=0, validation_alias=AliasChoices("MODELPRESS_UPLOAD_MAX_PARTS", "upload_max_parts"))
    # An open session not completed within this is expired and its parts deleted.
    upload_session_ttl_s: int = Field(
        24 * 3600, gt=0, validation_alias=AliasChoices("MODELPRESS_UPLOAD_SESSION_TTL_S", "upload_session_ttl_s"))
    max_open_upload_sessions: int = Field(
        20, gt=0, validation_alias=AliasChoices("MODELPRESS_MAX_OPEN_UPLOAD_SESSIONS", "max_open_upload_sessions"))
    max_dataset_samples: int = Field(
        200_000, gt=0, validation_alias=AliasChoices("MODELPRESS_MAX_DATASET_SAMPLES", "max_dataset_samples")
    )
    max_image_pixels: int = Field(
        4096 * 4096, gt=0, validation_alias=AliasChoices("MODELPRESS_MAX_IMAGE_PIXELS", "max_image_pixels")
    )
    # JSON request bodies (job specs): far above any real job, far below what could fill the database.
    max_json_body_bytes: int = Field(
        256 * 1024, gt=0, validation_alias=AliasChoices("MODELPRESS_MAX_JSON_BODY_BYTES", "max_json_body_bytes")
    )
    # Each chunk of a request body must arrive within this (a stalled upload frees its connection).
    body_idle_timeout_s: float = Field(
        60.0, gt=0, validation_alias=AliasChoices("MODELPRESS_BODY_IDLE_TIMEOUT_S", "body_idle_timeout_s")
    )
    # Uploads are read (protobuf, onnx.checker, zip, JSON) in a limited child process (service/sandbox.py):
    # past these a model is refused with model_parse_timeout / model_parse_out_of_memory, the API unharmed.
    # The memory limit is address space: it must hold the interpreter (~0.5 GiB) and about 4x the model.
    model_parse_timeout_s: float = Field(
        120.0, gt=0, validation_alias=AliasChoices("MODELPRESS_MODEL_PARSE_TIMEOUT_S", "model_parse_timeout_s")
    )
    model_parse_memory_bytes: int = Field(
        6 * 1024 * MiB, gt=0,
        validation_alias=AliasChoices("MODELPRESS_MODEL_PARSE_MEMORY_BYTES", "model_parse_memory_bytes"),
    )
    # Dataset uploads likewise (zip, .npy headers, Pillow decoding every image): the time covers
    # decoding up to MODELPRESS_MAX_DATASET_SAMPLES images.
    dataset_parse_timeout_s: float = Field(
        600.0, gt=0, le=3600,
        validation_alias=AliasChoices("MODELPRESS_DATASET_PARSE_TIMEOUT_S", "dataset_parse_timeout_s"),
    )
    dataset_parse_memory_bytes: int = Field(
        4 * 1024 * MiB, gt=0,
        validation_alias=AliasChoices("MODELPRESS_DATASET_PARSE_MEMORY_BYTES", "dataset_parse_memory_bytes"),
    )
    # Children started in advance (parsers imported) that each read one upload and exit, per kind of
    # upload (models, datasets); 0: every upload starts its own. Each idle one holds ~60 MiB;
    # concurrent uploads beyond them start cold children.
    parse_warm_children: int = Field(
        1, ge=0, le=8, validation_alias=AliasChoices("MODELPRESS_PARSE_WARM_CHILDREN", "parse_warm_children"),
    )
    # Upload parsers in their own user, mount and network namespaces where the kernel allows it
    # (service/confine.py: no network, the data folder and storage root covered); false: rlimits only.
    parse_namespaces: bool = Field(True, validation_alias=AliasChoices("MODELPRESS_PARSE_NAMESPACES", "parse_namespaces"))
    # Host names this instance answers to (comma-separated); empty: any. `python -m service` bound
    # to loopback sets the loopback names, so a 127.0.0.1 instance cannot be reached by DNS rebinding.
    allowed_hosts: str = Field("", validation_alias=AliasChoices("MODELPRESS_ALLOWED_HOSTS", "allowed_hosts"))
    job_time_limit_s: int = Field(
        3600, gt=0, validation_alias=AliasChoices("MODELPRESS_JOB_TIME_LIMIT_S", "job_time_limit_s")
    )
    max_job_attempts: int = Field(3, gt=0, validation_alias=AliasChoices("MODELPRESS_MAX_JOB_ATTEMPTS", "max_job_attempts"))
    # A running job whose heartbeat (every 10 s, from its own thread) is older than this is taken as
    # lost (its worker died); with the reaper's 10 s round, a dead worker's job is re-run within a minute.
    stale_job_after_s: int = Field(
        45, gt=0, validation_alias=AliasChoices("MODELPRESS_STALE_JOB_AFTER_S", "stale_job_after_s")
    )
    # Route jobs that train (they name a GPU-capable step) to the "gpu" queue.
    gpu_queue: bool = Field(False, validation_alias=AliasChoices("MODELPRESS_GPU_QUEUE", "gpu_queue"))
    # Threads used when measuring latency; recorded with every measurement.
    bench_threads: int = Field(1, gt=0, validation_alias=AliasChoices("MODELPRESS_BENCH_THREADS", "bench_threads"))
    # Modules imported at start-up by the API and the workers; each registers extra step types
    # (a config with `register_config` and a handler with `register`).
    plugins: str = Field("", validation_alias=AliasChoices("MODELPRESS_PLUGINS", "plugins"))
    # API processes `python -m service` starts with a broker (0: one per core, at most 4). The
    # embedded default is always one: its worker thread and SQLite writer live in that process.
    api_workers: int = Field(0, ge=0, validation_alias=AliasChoices("MODELPRESS_API_WORKERS", "api_workers"))
    # PostgreSQL connections per API process: sync routes run on anyio's 40 threads, but on a few
    # cores a handful of connections keeps the database busy; the rest wait in the pool briefly.
    # api_workers * (db_pool_size + db_max_overflow) must stay under the server's max_connections.
    db_pool_size: int = Field(10, gt=0, validation_alias=AliasChoices("MODELPRESS_DB_POOL_SIZE", "db_pool_size"))
    db_max_overflow: int = Field(10, ge=0, validation_alias=AliasChoices("MODELPRESS_DB_MAX_OVERFLOW", "db_max_overflow"))
    # The tenant of requests made without a key where keys are not required (the embedded default).
    default_tenant: str = "default"
    # Where the API listens (`python -m service`); whether keys are required depends on it.
    host: str = Field("127.0.0.1", validation_alias=AliasChoices("HOST", "host"))
    port: int = Field(8000, gt=0, validation_alias=AliasChoices("PORT", "port"))
    # "auto": keys are required unless this is the embedded default on a loopback address;
    # "on": always required; "off": never (logged as a warning everywhere but the embedded default).
    auth: Literal["auto", "on", "off"] = Field("auto", validation_alias=AliasChoices("MODELPRESS_AUTH", "auth"))
    # "production" requires keys like a public bind address does.
    environment: Literal["development", "production"] = Field(
        "development", validation_alias=AliasChoices("MODELPRESS_ENV", "environment"))
    # Requests per minute per tenant when its row sets no limit of its own.
    requests_per_minute: int = Field(
        6000, gt=0, validation_alias=AliasChoices("MODELPRESS_REQUESTS_PER_MINUTE", "requests_per_minute"))
    # The limiter's counters: a limits storage URI ("redis://...", "memory://"); empty means the
    # broker's Redis in production and memory when embedded.
    rate_limit_storage_url: str = Field(
        "", validation_alias=AliasChoices("MODELPRESS_RATE_LIMIT_STORAGE_URL", "rate_limit_storage_url"))
    # Comma-separated origins allowed by CORS; empty keeps CORS off (no browser origin may call the API).
    cors_origins: str = Field("", validation_alias=AliasChoices("MODELPRESS_CORS_ORIGINS", "cors_origins"))
    # On S3 storage, artifact downloads (all but report.html) answer 307 to a presigned URL valid
    # this many seconds, so large models do not pass through the API; 0 keeps them streamed by it.
    download_redirect_s: int = Field(0, ge=0, le=7 * 24 * 3600,
                                     validation_alias=AliasChoices("MODELPRESS_DOWNLOAD_REDIRECT_S", "download_redirect_s"))
    # Operations (service/ops/): "json" writes one JSON object per log line, "text" a readable line;
    # both carry the request id (and the job id in the worker).
    log_format: Literal["json", "text"] = Field("text", validation_alias=AliasChoices("MODELPRESS_LOG_FORMAT", "log_format"))
    # A bearer token that may read /metrics (a Prometheus scraper) besides admin keys; empty: admin keys
    # only, or anyone where keys are not required (the embedded default on loopback).
    metrics_token: str = Field("", max_length=256, validation_alias=AliasChoices("MODELPRESS_METRICS_TOKEN", "metrics_token"))
    # Series per label set that /metrics reads from the database (error codes, workers): bounded, so a
    # flood of odd codes or dead workers cannot make a scrape unbounded.
    metrics_max_series: int = Field(200, gt=0, le=10_000,
                                    validation_alias=AliasChoices("MODELPRESS_METRICS_MAX_SERIES", "metrics_max_series"))
    # prometheus_client's own variable: where several API processes keep their HTTP counters so one
    # scrape sums them. `python -m service` sets it (data_dir/prometheus) when it starts several.
    prometheus_multiproc_dir: str = Field("", validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"))
    # An X-Request-ID longer than this (or with other characters than letters, digits and ._:-) is
    # replaced by a fresh one.
    request_id_max_chars: int = Field(128, gt=0, le=1024,
                                      validation_alias=AliasChoices("MODELPRESS_REQUEST_ID_MAX_CHARS", "request_id_max_chars"))
    # OpenTelemetry traces go to this OTLP/HTTP endpoint when it is set and the opentelemetry packages
    # are installed; otherwise nothing is traced and nothing is imported.
    otel_endpoint: str = Field("", validation_alias=AliasChoices("MODELPRESS_OTEL_ENDPOINT", "otel_endpoint"))
    # Live progress (GET /v1/jobs/{id}/events, service/job_events): how often a stream reads the
    # job's new events, how often an idle stream sends a keep-alive comment (under the 60 s idle
    # timeout of common proxies), how long one stream lives before the client reconnects with
    # Last-Event-ID, and how many streams one API process holds open at once.
    sse_poll_interval_s: float = Field(
        0.5, gt=0, le=60, validation_alias=AliasChoices("MODELPRESS_SSE_POLL_INTERVAL_S", "sse_poll_interval_s"))
    sse_keepalive_s: float = Field(
        15.0, gt=0, le=300, validation_alias=AliasChoices("MODELPRESS_SSE_KEEPALIVE_S", "sse_keepalive_s"))
    sse_max_stream_s: float = Field(
        3600.0, gt=0, le=86400, validation_alias=AliasChoices("MODELPRESS_SSE_MAX_STREAM_S", "sse_max_stream_s"))
    sse_max_streams: int = Field(
        200, gt=0, validation_alias=AliasChoices("MODELPRESS_SSE_MAX_STREAMS", "sse_max_streams"))
    # Idempotency-Key on POSTs (service/idempotency): how long a key's first answer is kept, how
    # long a repeat waits for the first request still running before a 409, when a request still
    # marked running is taken for dead (its API process stopped), the largest answer kept, and
    # how many unexpired keys a tenant may hold.
    idempotency_ttl_s: int = Field(
        86400, gt=0, validation_alias=AliasChoices("MODELPRESS_IDEMPOTENCY_TTL_S", "idempotency_ttl_s"))
    idempotency_wait_s: float = Field(
        5.0, ge=0, le=60, validation_alias=AliasChoices("MODELPRESS_IDEMPOTENCY_WAIT_S", "idempotency_wait_s"))
    idempotency_in_progress_timeout_s: int = Field(
        900, gt=0, validation_alias=AliasChoices("MODELPRESS_IDEMPOTENCY_IN_PROGRESS_TIMEOUT_S",
                                                 "idempotency_in_progress_timeout_s"))
    idempotency_max_response_bytes: int = Field(
        1 * MiB, gt=0, validation_alias=AliasChoices("MODELPRESS_IDEMPOTENCY_MAX_RESPONSE_BYTES",
                                                     "idempotency_max_response_bytes"))
    idempotency_max_keys_per_tenant: int = Field(
        100_000, gt=0, validation_alias=AliasChoices("MODELPRESS_IDEMPOTENCY_MAX_KEYS_PER_TENANT",
                                                     "idempotency_max_keys_per_tenant"))
    # Webhooks (service/webhooks, worker/webhooks.py). Seconds to wait after each failed attempt:
    # Standard Webhooks' ladder, about 15.5 hours in all; the delivery fails after the last.
    webhook_retry_schedule_s: list[float] = Field(
        [5, 300, 1800, 7200, 18000, 36000, 36000], min_length=1, max_length=20,
        validation_alias=AliasChoices("MODELPRESS_WEBHOOK_RETRY_SCHEDULE_S", "webhook_retry_schedule_s"))
    # One attempt (connect + answer); the receiver's body is never read.
    webhook_timeout_s: float = Field(10.0, gt=0, le=60,
                                     validation_alias=AliasChoices("MODELPRESS_WEBHOOK_TIMEOUT_S", "webhook_timeout_s"))
    webhook_poll_interval_s: float = Field(
        2.0, gt=0, le=60, validation_alias=AliasChoices("MODELPRESS_WEBHOOK_POLL_INTERVAL_S", "webhook_poll_interval_s"))
    # Deliveries one sender takes per poll.
    webhook_batch_size: int = Field(20, gt=0, le=500,
                                    validation_alias=AliasChoices("MODELPRESS_WEBHOOK_BATCH_SIZE", "webhook_batch_size"))
    webhook_max_endpoints: int = Field(
        20, gt=0, le=1000, validation_alias=AliasChoices("MODELPRESS_WEBHOOK_MAX_ENDPOINTS", "webhook_max_endpoints"))
    webhook_url_max_length: int = Field(
        2048, gt=0, le=2048, validation_alias=AliasChoices("MODELPRESS_WEBHOOK_URL_MAX_LENGTH", "webhook_url_max_length"))
    # Endpoints on loopback, private or link-local addresses (the cloud metadata service): refused
    # wherever keys are required, unless this is set; the local user of the embedded default may.
    webhook_allow_private_urls: bool = Field(
        False, validation_alias=AliasChoices("MODELPRESS_WEBHOOK_ALLOW_PRIVATE_URLS", "webhook_allow_private_urls"))
    # Run the sender in this worker (Celery worker or embedded); off for a worker that must not post.
    webhook_sender: bool = Field(True, validation_alias=AliasChoices("MODELPRESS_WEBHOOK_SENDER", "webhook_sender"))
    # Embedded mode only: run migrations at start-up.
    migrate_on_start: bool = Field(True, validation_alias=AliasChoices("MODELPRESS_MIGRATE_ON_START", "migrate_on_start"))

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'modelpress.db'}"

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or str(self.data_dir / "objects")

    @property
    def embedded_worker(self) -> bool:
        return not self.broker_url

    @property
    def allowed_host_names(self) -> list[str]:
        return [name.strip() for name in self.allowed_hosts.split(",") if name.strip()]

    @property
    def effective_api_workers(self) -> int:
        if self.embedded_worker:
            return 1
        return self.api_workers or min(os.cpu_count() or 1, 4)

    @property
    def loopback_only(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"}

    @property
    def keys_required(self) -> bool:
        if self.auth != "auto":
            return self.auth == "on"
        return not (self.embedded_worker and self.loopback_only and self.environment != "production")

    @property
    def auth_mode(self) -> str:
        """What /readyz and the start-up log say about keys."""
        if self.keys_required:
            return "api_keys"
        return "off" if self.auth == "off" else "local_without_keys"

    @property
    def broker_transport_options(self) -> dict:
        """Shared by the API's sender and the workers (both must agree on the prefix)."""
        options: dict = {"visibility_timeout": self.job_time_limit_s + 600}
        if self.broker_key_prefix:
            options["global_keyprefix"] = self.broker_key_prefix
        return options

    @property
    def effective_rate_limit_storage_url(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else "memory://"

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def plugin_modules(self) -> list[str]:
        return [name.strip() for name in self.plugins.split(",") if name.strip()]

    def load_plugins(self) -> None:
        for name in self.plugin_modules:
            importlib.import_module(name)

    @property
    def model_parse_limits(self) -> Limits:
        return Limits(wall_s=self.model_parse_timeout_s, cpu_s=max(1, int(self.model_parse_timeout_s)),
                      memory_bytes=self.model_parse_memory_bytes)

    @property
    def dataset_parse_limits(self) -> Limits:
        return Limits(wall_s=self.dataset_parse_timeout_s, cpu_s=max(1, int(self.dataset_parse_timeout_s)),
                      memory_bytes=self.dataset_parse_memory_bytes)

    @property
    def webhook_private_urls_allowed(self) -> bool:
        return self.webhook_allow_private_urls or not self.keys_required

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _bounded_waits(cls, value: list[float]) -> list[float]:
        if any(not 0 < wait <= 48 * 3600 for wait in value):
            raise ValueError("each webhook retry wait is more than 0 and at most 48 hours")
        return value

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"


@lru_cache
def get_settings() -> Settings:
    return Settings()
