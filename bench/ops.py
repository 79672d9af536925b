"""The service on a multi-node Ray cluster on this machine, under load and a fault.

    .venv/bin/python bench/ops.py --fault replica          # SIGKILL-equivalent kill of a Generator replica
    .venv/bin/python bench/ops.py --fault node             # a worker node's raylet and its workers, at once
    .venv/bin/python bench/ops.py --catalog DIR --clients 64 --duration-s 60
    .venv/bin/python bench/ops.py --fault none --canary       # then canaries under load (below)

A `ray.cluster_utils.Cluster` (a head and `--workers` worker nodes, each its own raylet with its own
CPUs, as KubeRay pods are) runs the app from serve_app/serve_config.yaml with the Generator
autoscaling from 1 replica. `--clients` threads, each its own `SwitchboardClient` (which retries
UNAVAILABLE with backoff), send Generate requests for `--duration-s`; halfway, the fault. Replica
counts are sampled every second, through the load and `--cooldown-s` after it (scale-down).

  requests   calls made; each ends answered or failed after the client's retries
  errors     calls that failed after retries (any code)
  lost       of those, the ones with a code the client may not retry (INTERNAL, UNKNOWN, ...): lost work
  retried    attempts retried after UNAVAILABLE (a killed replica's requests, a draining node's)
  recovery_s from the fault until answers per second stay at >= 80% of the 10 s before it (clients' view)
  stall_s    how long the longest request in flight at the fault took after it (its retries included)

`--canary` adds, after that, two rollouts under `--clients` clients sending labelled demo requests with
sticky session keys, driven through the Admin service: a bad candidate (its task index built on swapped
labels) must be rolled back by the analysis before its policy gives up on it (`max_inconclusive`
analyses) with no failed request answered by stable; then a good candidate (the same tasks, an index
from most of the same records) must be promoted through every step to 100%.

  canary_bad_rolled_back   the bad candidate ended rolled_back by a Failed check, in time, 0 failed on stable
  canary_good_promoted     the good candidate ended promoted by the analysis
  canary_log               every analysis decision of both rollouts that moved them (and the last hold), with numbers
Without `--catalog`, a small one is built first (two demo tasks, adapters of a few steps on the tiny base).
Progress goes to stderr, a table to stdout, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from serve_app import launch  # noqa: E402
from serve_app.client import RetryPolicy, SwitchboardClient  # noqa: E402

TEXTS = ("The patient weighs 7 kg; the dose is 5 mg/kg a day.", "Shares of Acme rose 4% after the results.",
         "Revenue fell short of guidance for the third quarter.", "Give 250 mg twice daily for ten days.")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
WORKER = "switchboard_worker"   # a custom resource only worker nodes have


def log(msg: str) -> None:
    print(f"[ops] {msg}", file=sys.stderr, flush=True)


def small_catalog(work: Path) -> Path:
    from training.adapter import TrainSpec, train_adapters
    from training.base_model import resolve_base_model
    from training.catalog_build import build_catalog
    from training.demo_corpus import demo_records

    keys = ("fin/sentiment", "med/dose")
    base = resolve_base_model("tiny-test", progress=False)
    train_adapters(base, [r for r in demo_records("train") if r.key in keys], work / "adapters",
                   train=TrainSpec(max_steps=4), progress=False)
    return build_catalog([r for r in demo_records("val") if r.key in keys], work / "catalog",
                         adapters=work / "adapters", base_model=("tiny-test", base)).root


def app_config(catalog: Path, max_replicas: int, grpc_port: int) -> dict:
    """The app's Serve config, with the Generator on worker nodes only and quick to autoscale (a one-minute run
    shows it); one proxy, on the head (every node's proxy would want the same port on this one machine)."""
    config = launch.load_config(args={"catalog": str(catalog), "max_new_tokens": 8}, grpc_port=grpc_port)
    config["proxy_location"] = "HeadOnly"
    for d in config["applications"][0]["deployments"]:
        if d["name"] == "Generator":
            d["autoscaling_config"] = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max_replicas,
                                       "target_ongoing_requests": 8, "upscale_delay_s": 3, "downscale_delay_s": 15}
            d["ray_actor_options"] = {**d.get("ray_actor_options", {}), "resources": {WORKER: 0.01}}
    return config


def generator_replicas() -> tuple[int, list[dict]]:
    """RUNNING Generator replicas now (Serve's view), and the live Generator replica actors (name, node)."""
    from ray import serve
    from ray._private.state import actors   # no public API gives an actor's node without the dashboard

    status = serve.status().applications["switchboard"].deployments["Generator"]
    live = [{"name": a["Name"], "node": a["Address"]["NodeID"]}
            for a in actors(actor_state_name="ALIVE").values() if "#Generator#" in a["Name"]]
    return status.replica_states.get("RUNNING", 0), live


class Load:
    """`clients` threads sending Generate until stopped; what each call ended as, and when. With `labelled`
    ((text, true task) pairs) each client is a session (sticky in a canary split) and says the true task."""

    def __init__(self, address: str, clients: int, labelled: list[tuple[str, str]] | None = None):
        self.address, self.clients, self.labelled = address, clients, labelled
        self.results: list[tuple[float, float, str]] = []   # (end time, latency ms, code name)
        self.versions: Counter = Counter()   # catalog version that answered -> replies
        self.retried = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with SwitchboardClient(self.address, timeout_s=120, retry=RetryPolicy(attempts=10, max_s=3.0)) as client:
            n = 0
            while not self.stop.is_set():
                started = time.monotonic()
                version = ""
                try:
                    if self.labelled:
                        text, task = self.labelled[(i + n) % len(self.labelled)]
                        reply = client.generate(text, max_new_tokens=4, session_key=f"client{i}", true_task=task)
                    else:
                        reply = client.generate(f"{TEXTS[(i + n) % len(TEXTS)]} ({i}.{n})", max_new_tokens=8)
                    code, version = "OK", reply.decision.catalog_version
                except grpc.RpcError as e:
                    code = e.code().name
                with self.lock:
                    self.results.append((time.monotonic(), 1000 * (time.monotonic() - started), code))
                    self.versions[version or code] += 1
                n += 1
            with self.lock:
                self.retried += client.retries

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def fault(kind: str, cluster, workers: list) -> dict:
    import ray

    _, live = generator_replicas()
    victim = live[0]
    if kind == "replica":
        ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)   # SIGKILLs its process
        return {"killed": victim["name"]}
    node = next((w for w in workers if w.node_id == victim["node"]), workers[0])
    cluster.remove_node(node, allow_graceful=False)   # SIGKILLs the node's raylet, object store and workers
    workers.remove(node)
    return {"killed_node": node.node_id[:12], "generator_replicas_on_it": sum(r["node"] == node.node_id for r in live)}


CANARY_TOKEN = "ops-bench-admin-token-0123456789"
CANARY_POLICY = """
steps: [shadow, 25, 100]
min_requests: {min_requests}
interval_s: 2
checks: {{error_rate_margin: 0.02, max_p99_latency_ratio: 3, min_agreement: 0.85, accuracy_margin: 0.05,
          min_labelled: 20}}
max_inconclusive: 60
"""


def candidates(catalog: Path, work: Path) -> tuple[Path, Path]:
    """(bad, good) candidates of `catalog`: an index on swapped task labels, and one from 4/5 of its records."""
    import dataclasses

    from routing.catalog import Catalog
    from training.base_model import resolve_base_model
    from training.catalog_build import build_catalog
    from training.demo_corpus import demo_records

    stable = Catalog.load(catalog, verify=False)
    keys = sorted(stable.tasks)
    val = [r for r in demo_records("val") if r.key in keys]
    swap = dict(zip(keys, keys[1:] + keys[:1]))
    build = dict(adapters=catalog.parent / "adapters", base_model=("tiny-test", resolve_base_model("tiny-test",
                                                                                                progress=False)))
    bad = build_catalog([dataclasses.replace(r, domain=swap[r.key].split("/")[0], task=swap[r.key].split("/")[1])
                         for r in val], work / "bad", **build)
    good = build_catalog([r for i, r in enumerate(val) if i % 5], work / "good", **build)
    return bad.root, good.root


def canary_under_load(address: str, clients: int, catalog: Path, work: Path, state: Path, min_requests: int,
                      timeout_s: float = 600) -> dict:
    """The bad candidate rolled back, then the good one promoted, each under load; what decided, and when."""
    from routing.catalog import Catalog
    from serve_app.admin import AdminClient
    from training.demo_corpus import demo_records

    keys = set(Catalog.load(catalog, verify=False).tasks)
    labelled = [(r.input, r.key) for r in demo_records("test") if r.key in keys]
    stable_version = Catalog.load(catalog, verify=False).version
    bad, good = candidates(catalog, work)
    policy = CANARY_POLICY.format(min_requests=min_requests)
    out: dict = {"canary_log": []}
    with AdminClient(address, CANARY_TOKEN) as admin:
        for name, candidate, want in (("bad", bad, "rolled_back"), ("good", good, "promoted")):
            load = Load(address, clients, labelled)
            load.start()
            started = time.monotonic()
            status = admin.start(str(candidate), policy)
            log(f"canary {name}: rollout {status['rollout_id']} of {status['candidate']['version']} started")
            while status["status"] == "running" and time.monotonic() - started < timeout_s:
                time.sleep(1)
                status = admin.status()
            took = time.monotonic() - started
            load.finish()
            final = status.get("last_decision") or {}
            history = json.loads(state.read_text())["history"]   # every decision, with its numbers
            for entry in [h for h in history if h["action"] != "hold"] or history[-1:]:
                out["canary_log"].append({"rollout": name, **_brief(entry)})
                log(f"canary {name}: {out['canary_log'][-1]}")
            failed = sum(n for v, n in load.versions.items() if v not in (stable_version, status["candidate"]["version"]))
            on_stable = load.versions.get(stable_version, 0)
            policy_window = 2 * 60   # interval_s x max_inconclusive: the policy's limit on judging
            out[f"canary_{name}"] = {"status": status["status"], "decided_s": round(took, 1), "requests":
                                     len(load.results), "failed": failed, "answered_by_stable": on_stable,
                                     "answered_by_candidate": load.versions.get(status["candidate"]["version"], 0),
                                     "candidate_version": status["candidate"]["version"]}
            if name == "bad":
                out["canary_bad_rolled_back"] = (status["status"] == want and final.get("action") == "rollback"
                                                 and took <= policy_window and failed == 0)
            else:
                out["canary_good_promoted"] = status["status"] == want and failed == 0
                stable_version = status["candidate"]["version"] if status["status"] == "promoted" else stable_version
    return out


def _brief(decision: dict) -> dict:
    return {"by": decision.get("by"), "step": decision.get("step"), "action": decision.get("action"),
            "reason": decision.get("reason"),
            "numbers": {m["name"]: [m.get("value"), m["phase"]] for m in decision.get("measurements", [])}}


def recovery_after(results: list[tuple[float, float, str]], fault: float, end: float, window_s: float = 2.0,
                   share: float = 0.8) -> tuple[float, float]:
    """(recovery_s, stall_s) of a fault at monotonic time `fault`, from the clients' side.

    recovery_s: until answers per second (over `window_s`) stay at >= `share` of the 10 s before the fault.
    stall_s: how long the longest request in flight at the fault went on after it (retries included).
    Serve's replica count is no measure of this: it counts a dead replica RUNNING until its health check fails.
    """
    ends = [t for t, _, code in results if code == "OK"]

    def rate(a: float, b: float) -> float:
        return sum(a <= t < b for t in ends) / (b - a)

    base = rate(fault - 10, fault)
    starts = [fault + i * 0.5 for i in range(int((end - window_s - fault) / 0.5))]
    low = [t for t in starts if rate(t, t + window_s) < share * base]
    recovery = (low[-1] + window_s - fault) if low else 0.0
    stall = max((t - fault for t, ms, _ in results if t - ms / 1000 < fault < t), default=0.0)
    return round(recovery, 1), round(stall, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", type=Path)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration-s", type=float, default=60)
    ap.add_argument("--cooldown-s", type=float, default=30)
    ap.add_argument("--fault", choices=["none", "replica", "node"], default="replica")
    ap.add_argument("--workers", type=int, default=2, help="worker nodes beside the head")
    ap.add_argument("--worker-cpus", type=int, default=2)
    ap.add_argument("--max-replicas", type=int, default=3, help="the Generator's autoscaling ceiling")
    ap.add_argument("--grpc-port", type=int, default=29500)
    ap.add_argument("--canary", action="store_true", help="then a bad and a good canary rollout under load")
    ap.add_argument("--canary-min-requests", type=int, default=200, help="the canary policy's min_requests")
    args = ap.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    work = tempfile.TemporaryDirectory(prefix="ops-bench-")
    catalog = args.catalog or small_catalog(Path(work.name))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=args.worker_cpus, resources={WORKER: 100}) for _ in range(args.workers)]
    log(f"cluster: head + {args.workers} workers x {args.worker_cpus} CPUs at {cluster.address}")
    timeline: list[tuple[float, int]] = []
    canary: dict = {"canary_bad_rolled_back": None, "canary_good_promoted": None}
    try:
        config = app_config(catalog, args.max_replicas, args.grpc_port)
        config["applications"][0]["args"] |= {"admin_token": CANARY_TOKEN,
                                              "canary_state": str(Path(work.name) / "canary.json")}
        launch.start(config, address=cluster.address)
        load = Load(f"127.0.0.1:{args.grpc_port}", args.clients)
        t0 = time.monotonic()
        load.start()
        log(f"{args.clients} clients for {args.duration_s:.0f} s; fault '{args.fault}' at half time")
        fault_at, fault_info, before = None, {}, None
        while time.monotonic() - t0 < args.duration_s + args.cooldown_s:
            now = time.monotonic() - t0
            running, _ = generator_replicas()
            timeline.append((round(now, 1), running))
            if args.fault != "none" and fault_at is None and now >= args.duration_s / 2:
                before = max(r for _, r in timeline[-5:])
                fault_info, fault_at = fault(args.fault, cluster, workers), now
                log(f"t={now:.0f}s fault: {fault_info} ({before} Generator replicas running)")
            if now >= args.duration_s and not load.stop.is_set():
                load.finish()
                log(f"t={now:.0f}s load stopped; watching the Generator scale down")
            time.sleep(1)
        load.finish()
        if args.canary:
            canary = canary_under_load(f"127.0.0.1:{args.grpc_port}", args.clients, Path(catalog), Path(work.name),
                                       Path(work.name) / "canary.json", args.canary_min_requests)
    finally:
        ray.shutdown()
        cluster.shutdown()
        work.cleanup()

    codes = Counter(code for _, _, code in load.results)
    ok = sorted(ms for _, ms, code in load.results if code == "OK")
    errors = sum(n for code, n in codes.items() if code != "OK")
    lost = sum(n for code, n in codes.items() if code != "OK" and grpc.StatusCode[code] not in RETRYABLE)
    recovery = stall = None
    if fault_at is not None:
        recovery, stall = recovery_after(load.results, t0 + fault_at, t0 + args.duration_s)
    result = {"clients": args.clients, "duration_s": args.duration_s, "fault": args.fault, **fault_info,
              "nodes": 1 + args.workers, "requests": len(load.results), "errors": errors, "lost": lost,
              "codes": dict(codes), "retried": load.retried,
              "throughput_rps": round(len(ok) / args.duration_s, 1),
              "p50_ms": round(statistics.median(ok), 1) if ok else None,
              "p99_ms": round(ok[int(0.99 * (len(ok) - 1))], 1) if ok else None,
              "max_replicas_seen": max(r for _, r in timeline), "final_replicas": timeline[-1][1],
              "recovery_s": recovery, "stall_s": stall, "replicas_over_time": timeline, **canary}
    print(f"{'clients':>8} {'requests':>9} {'errors':>7} {'lost':>5} {'retried':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max repl':>9} {'recovery s':>11} {'stall s':>8}")
    print(f"{result['clients']:>8} {result['requests']:>9} {errors:>7} {lost:>5} {load.retried:>8} "
          f"{result['p50_ms']!s:>8} {result['p99_ms']!s:>8} {result['max_replicas_seen']:>9} {recovery!s:>11} "
          f"{stall!s:>8}")
    print("Generator replicas (s: running): " + ", ".join(f"{t:.0f}:{r}" for t, r in timeline[::5]))
    for name in ("bad", "good") if args.canary else ():
        row = canary[f"canary_{name}"]
        print(f"canary {name:>4}: {row['status']:<11} in {row['decided_s']:>6} s; {row['requests']} requests, "
              f"{row['failed']} failed, {row['answered_by_stable']} answered by stable, "
              f"{row['answered_by_candidate']} by the candidate")
    for entry in canary.get("canary_log", []):
        print(f"  {entry['rollout']:>4} step {entry['step']}: {entry['action']:<8} {entry['reason']}  {entry['numbers']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
