"""Optional OpenTelemetry tracing: on only when MODELPRESS_OTEL_ENDPOINT is set *and* the packages
are installed (`pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
opentelemetry-instrumentation-fastapi`); otherwise nothing is imported and nothing changes."""

import logging

log = logging.getLogger(__name__)


def install_tracing(app, *, endpoint: str, service_name: str = "modelpress-api") -> bool:
    if not endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("MODELPRESS_OTEL_ENDPOINT is set but OpenTelemetry is not installed (%s): no tracing", exc.name)
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    log.info("OpenTelemetry traces go to %s", endpoint)
    return True
