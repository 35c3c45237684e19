"""modelpress workers: the Celery app, the job runner and the compression engine."""
