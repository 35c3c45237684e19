"""Resumable upload sessions: a file sent in checksummed parts, resumed after a cut connection,
then handed to the models or datasets service as one upload (the same checks as a single request)."""
