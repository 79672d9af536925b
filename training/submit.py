"""`switchboard sweep --submit`: the sweep as a Ray Job on a running cluster, through the Jobs API the dashboard serves.

The job's driver is `switchboard sweep --config FILE` itself (as in k8s/rayjob-sweep.yaml), so it joins
the cluster (`RAY_ADDRESS` is set for a job) and its trials show in the dashboard, their reports as Ray
metrics (`training.tune_trial.TrialMetrics`). FILE is read by the driver: give its path as the cluster
sees it. Ray 2.60 turns token auth on: the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, as Ray looks for it) goes with every call as `Authorization: Bearer`.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(ValueError):
    """The submitted sweep ended other than SUCCEEDED (the command exits non-zero, naming the job)."""


def ray_token() -> str | None:
    """The cluster token where Ray itself looks for it, or None (a cluster without token auth)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def submit_sweep(config: str | Path, address: str, *, follow: bool = False, poll_s: float = 2.0,
                 agent_wait_s: float = 120.0) -> dict[str, Any]:
    """Submit `switchboard sweep --config CONFIG` to the cluster whose dashboard is at `address`; with
    `follow`, wait for the job to end and copy its log to stderr."""
    from ray.job_submission import JobSubmissionClient

    url = address if "://" in address else f"http://{address}"
    token = ray_token()
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"} if token else None)
    local = urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")
    python = sys.executable if local else "python"   # a cluster on this machine runs this checkout's venv
    config_path = str(Path(config).resolve()) if local else str(config)
    entrypoint = f"{shlex.quote(python)} -m serve_app.cli sweep --config {shlex.quote(config_path)}"
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint)
            break
        except RuntimeError as e:   # a cluster just started: its job agent comes up seconds after the dashboard
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(poll_s)
    print(f"sweep submitted as Ray job {job_id}: follow it with `ray job logs -f {job_id} --address {url}` "
          f"(RAY_AUTH_MODE=token), or on the dashboard's Jobs page", file=sys.stderr)
    status = client.get_job_status(job_id).value
    if follow:
        while status not in TERMINAL:
            time.sleep(poll_s)
            status = client.get_job_status(job_id).value
        print(client.get_job_logs(job_id), file=sys.stderr)
        if status != "SUCCEEDED":
            raise JobFailed(f"Ray job {job_id} ended {status}; its log is above")
    return {"job_id": job_id, "status": status, "dashboard": url}
