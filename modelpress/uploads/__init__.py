"""Upload formats read without running them, shared by the API (at upload) and the worker (before it loads)."""
