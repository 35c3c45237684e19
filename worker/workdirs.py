"""Work folders of job runs: one per delivery, named `<job id>-<delivery token>-<random>`, so a
folder left behind by a killed run can be told from the folder of a live one and removed."""

import logging
import shutil
import tempfile
from pathlib import Path

from service.jobs import runner_api

log = logging.getLogger(__name__)


def make_workdir(tmp_dir: Path, job_id: str, token: str) -> tempfile.TemporaryDirectory:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=tmp_dir, prefix=f"{job_id}-{token}-")


def remove_dead_workdirs(*, session_factory, tmp_dir: Path) -> int:
    """Remove every job work folder whose delivery no longer holds its job (finished, re-delivered,
    or never known). Safe beside live runs of other workers sharing the folder: theirs still hold
    their job's current token."""
    if not tmp_dir.exists():
        return 0
    folders = {}
    for folder in tmp_dir.iterdir():
        job_id, _, rest = folder.name.partition("-")
        if folder.is_dir() and job_id.startswith("job_") and rest:
            folders[folder] = (job_id, rest.split("-")[0])
    if not folders:
        return 0
    live = runner_api.live_run_tokens(sessions=session_factory, job_ids=sorted({job_id for job_id, _ in folders.values()}))
    removed = 0
    for folder, (job_id, token) in folders.items():
        if live.get(job_id) != token:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d work folder(s) of runs that are no longer live", removed)
    return removed
