"""Operations: request ids, JSON logs, /metrics, optional tracing (issue #15, part 5)."""
