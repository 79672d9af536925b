"""`switchboard sweep --submit`: a sweep as a Ray Job on a running cluster (the Jobs API the dashboard serves),
its trials' reports read back as Ray metrics from the node's metrics endpoint while it runs."""

from __future__ import annotations

import json
import time
import urllib.request

import yaml

from serve_app.cli import main


def test_a_sweep_submitted_as_a_ray_job_exports_its_trials_metrics(tmp_path, tiny_base, free_port, capsys):
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    from training.submit import ray_token

    dashboard = free_port()
    # Every port its own: other Ray clusters on this machine hold the defaults (the job agent's 52365).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": dashboard,
        "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": "tiny-test", "tasks": "demo", "task": ["fin/ticker"], "variants": ["lora"], "r": [4],
        "alpha": [8], "lr": [6.0e-3], "train": {"max_steps": 24, "batch_size": 8, "save_steps": 12, "warmup_steps": 2},
        "eval_every": 4, "val_per_task": 6, "output": str(tmp_path / "sweep"), "dashboard": False}))
    url = f"http://127.0.0.1:{dashboard}"
    try:
        assert main(["sweep", "--config", str(config), "--submit", "--address", url]) == 0
        out, err = capsys.readouterr()
        job = json.loads(out.strip().splitlines()[-1])
        assert f"Ray dashboard: {url}" in err and "ray get-auth-token" in err and job["job_id"] in err

        token = ray_token()
        jobs = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"} if token else None)
        metrics_url = f"http://127.0.0.1:{cluster.head_node.metrics_export_port}/metrics"
        deadline, seen, status = time.monotonic() + 600, [], "PENDING"
        while time.monotonic() < deadline and not (seen and status in ("SUCCEEDED", "FAILED", "STOPPED")):
            if not seen:   # read while the trial runs (and a little after: the exporter's interval)
                text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
                seen = [line for line in text.splitlines() if line.startswith("ray_switchboard_trial_eval_loss")]
            status = jobs.get_job_status(job["job_id"]).value
            if status in ("FAILED", "STOPPED"):
                break
            if status == "SUCCEEDED":
                deadline = min(deadline, time.monotonic() + 30)
            time.sleep(1)
        assert status == "SUCCEEDED", jobs.get_job_logs(job["job_id"])[-3000:]
        assert seen and 'task="fin/ticker"' in seen[0] and 'trial="lora-r4' in seen[0], seen
        assert len(json.loads((tmp_path / "sweep" / "results.json").read_text())) == 1
    finally:
        cluster.shutdown()
