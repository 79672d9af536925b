"""`switchboard serve` as a process: SIGTERM drains it, it starts the dashboard, it joins a running cluster.

Each test runs the real CLI in a subprocess, as Kubernetes or a user runs it, and sends it real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve_app.client import NO_RETRY, SwitchboardClient

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The patient weighs 7 kg and takes 5 mg a day."


def _port() -> int:
    """A free port below the kernel's ephemeral range and above Ray's worker ports (10002-19999): the Ray
    processes started while `serve` comes up bind ephemeral ports, and one took a port picked there."""
    import random
    import socket

    while True:
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _serve(catalog, grpc_port: int, http_port: int, *extra: str, log: Path) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "serve_app.cli", "serve", "--catalog", str(catalog.root),
                             "--grpc-port", str(grpc_port), "--http-port", str(http_port), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def _wait_serving(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:   # SERVING, and the command has said so (its notices come once the app is RUNNING)
                serving = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if serving == health_pb2.HealthCheckResponse.SERVING and "Ctrl-C or SIGTERM drains" in log.read_text():
                    return
            except grpc.RpcError:
                pass
            time.sleep(1)
    proc.kill()
    pytest.fail(f"serve not SERVING after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> dict:
    out, _ = proc.communicate(timeout=timeout_s)
    text = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{text[-3000:]}"
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(small_catalog, tmp_path):
    grpc_port, dashboard = _port(), _port()
    log = tmp_path / "serve.log"
    proc = _serve(small_catalog, grpc_port, _port(), "--dashboard-port", str(dashboard), log=log)
    _wait_serving(proc, grpc_port, log)

    # The dashboard runs, and `serve status` (which needs it) sees the app, given the token it was told about.
    notice = log.read_text()
    assert f"Ray dashboard: http://127.0.0.1:{dashboard}" in notice and "ray get-auth-token" in notice
    status = subprocess.run([str(Path(sys.executable).with_name("serve")), "status", "--address",
                             f"http://127.0.0.1:{dashboard}"], env={**os.environ, "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "switchboard" in status.stdout and "RUNNING" in status.stdout, status

    outcomes: list[tuple[float, grpc.StatusCode]] = []
    stop = threading.Event()

    def load() -> None:
        with SwitchboardClient(f"127.0.0.1:{grpc_port}", retry=NO_RETRY, timeout_s=60) as client:
            while not stop.is_set():
                try:
                    client.generate(TEXT, task="med/dose", max_new_tokens=24)
                    outcomes.append((time.monotonic(), grpc.StatusCode.OK))
                except grpc.RpcError as e:
                    outcomes.append((time.monotonic(), e.code()))
                    if e.code() != grpc.StatusCode.OK:
                        time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    sigterm_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = _finish(proc, log)
    stop.set()
    for t in threads:
        t.join(timeout=90)

    assert result["stopped"] and result["drained"], result
    codes = {code for _, code in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes   # nothing cut off or INTERNAL
    assert any(code == grpc.StatusCode.OK and t > sigterm_at for t, code in outcomes), "in-flight requests finished"
    assert any(code == grpc.StatusCode.UNAVAILABLE and t > sigterm_at for t, code in outcomes)
    assert sum(code == grpc.StatusCode.OK for t, code in outcomes if t < sigterm_at) >= 8


def test_serve_joins_a_running_multi_node_cluster(small_catalog, tmp_path):
    """`--address` of a cluster of two nodes started beforehand: the app runs there, and the cluster outlives it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        grpc_port, log = _port(), tmp_path / "serve.log"
        proc = _serve(small_catalog, grpc_port, _port(), "--address", cluster.address, log=log)
        _wait_serving(proc, grpc_port, log)
        with SwitchboardClient(f"127.0.0.1:{grpc_port}", timeout_s=60) as client:
            assert client.generate(TEXT, task="med/dose", max_new_tokens=4).new_tokens >= 1
        assert "Ray dashboard" not in log.read_text()   # a joined cluster's dashboard is its own business
        proc.send_signal(signal.SIGTERM)
        assert _finish(proc, log)["drained"]
        assert len(cluster.list_all_nodes()) == 2 and cluster.head_node.remaining_processes_alive()
    finally:
        cluster.shutdown()
