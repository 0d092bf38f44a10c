"""Submitting jobs to a Ray cluster through the Ray Jobs API (``raydag submit|status|logs|stop``).

A submission uploads the working directory (the project folder by default; Ray skips what
``.gitignore`` ignores, and :data:`EXCLUDES`) as the job's runtime environment, optionally with
pip requirements, and runs ``python -m raydag.cli run <job> <overrides>`` on the cluster. The
job file is checked here first, so a bad job fails before anything is uploaded.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from raydag.config import load_job
from raydag.errors import RaydagError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded, whatever .gitignore says: environments, run outputs, caches.
EXCLUDES = [".git", ".venv", "venv", "runs", "**/__pycache__", ".pytest_cache", "*.parquet"]


def job_address(address: str | None) -> str:
    """``--address``, else ``RAY_ADDRESS`` when it is a dashboard URL, else the local head."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not address.startswith(("http://", "https://")):
        raise RaydagError(f"--address must be the dashboard's URL (http://HEAD:8265), got {address!r}")
    return address


def client(address: str | None):
    """A Jobs API client; a clear error when no head answers at the address."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    # As `ray job submit` does: a Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    # ~/.ray/auth_token) is sent to clusters that use token authentication.
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        return JobSubmissionClient(url)
    except ConnectionError as err:
        raise RaydagError(f"no Ray Jobs API at {url} ({err}); start a head with "
                          "`ray start --head --dashboard-host 127.0.0.1` or pass --address") from None


def submission(job_path: str, overrides: list[str], working_dir: str | None,
               pip: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    """The entrypoint and runtime environment of a submission (checked, nothing sent).

    Raises:
        RaydagError: the job file is invalid, or not inside the working directory (the cluster
            only sees what is uploaded).
    """
    job = load_job(job_path, overrides)  # fails here, before any upload
    root = Path(working_dir or ".").resolve()
    path = Path(job_path).resolve()
    if not root.is_dir():
        raise RaydagError(f"--working-dir {root} is not a folder")
    if not path.is_relative_to(root):
        raise RaydagError(f"{job_path} is outside the working directory {root}, which is all "
                          "the cluster receives; run from the project folder or pass --working-dir")
    relative = path.relative_to(root).as_posix()
    entrypoint = " ".join(["python", "-m", "raydag.cli", "run", shlex.quote(relative),
                           *(shlex.quote(o) for o in overrides)])
    runtime_env: dict = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = dict(env)
    return {"entrypoint": entrypoint, "runtime_env": runtime_env, "job": job,
            "metadata": {"raydag_job": job.name, "job_file": relative}}


def submit(job_path: str, overrides: list[str], address: str | None, working_dir: str | None,
           pip: list[str] | None = None, env: dict[str, str] | None = None) -> str:
    """Submit the job; return the Ray job id (submission id)."""
    job_address(address)  # a malformed address fails before the job is even read
    spec = submission(job_path, overrides, working_dir, pip, env)
    jobs = client(address)
    try:
        return jobs.submit_job(entrypoint=spec["entrypoint"], runtime_env=spec["runtime_env"],
                               metadata=spec["metadata"])
    except RuntimeError as err:  # the API's errors (bad runtime env, upload too large, ...)
        raise RaydagError(f"the cluster at {job_address(address)} refused the job: {err}") from None


def _known(jobs, job_id: str, address: str | None) -> None:
    try:
        jobs.get_job_info(job_id)
    except RuntimeError as err:
        raise RaydagError(f"no job {job_id} at {job_address(address)} ({err})") from None


def status(job_id: str, address: str | None) -> dict:
    """``{"job_id", "status", "message", "entrypoint", "start_time", "end_time"}``."""
    jobs = client(address)
    _known(jobs, job_id, address)
    info = jobs.get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message or "",
            "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time}


def logs(job_id: str, address: str | None, follow: bool = False, out=None) -> str | None:
    """The job's logs so far; with ``follow``, stream them to ``out`` until the job ends."""
    jobs = client(address)
    _known(jobs, job_id, address)
    if not follow:
        return jobs.get_job_logs(job_id)
    import asyncio

    async def _tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    return None


def stop(job_id: str, address: str | None) -> bool:
    """Ask the cluster to stop the job; False when it had already finished."""
    jobs = client(address)
    _known(jobs, job_id, address)
    return jobs.stop_job(job_id)
