"""Canary rollouts of a candidate catalog version (a new selector, classifier, task index or adapter set).

- `policy`: the YAML policy (steps, minimum requests, checks), validated;
- `analysis`: the pure verdict (promote / hold / rollback) from per-version counters, with its numbers;
- `state`: the rollout state machine, the sticky split (`assign`) and the shared state file;
- `gate`: what a Router replica calls (below), and `commands`: what the CLI and the Admin service do.

The Router's side, per request (one `CanaryGate` per Router replica, on the app's state file):

    version = gate.assign(session_key)          # "stable" | "candidate"; the request stays on it, Router to
                                                # Generator, and its reply names that catalog_version
    shadow = gate.shadowing()                   # True: answer on stable, and route on the candidate too,
                                                # off the latency path; then record(..., agreed=...)
    gate.record(version, ok=..., latency_ms=..., agreed=..., correct=...)
                                                # correct: the request carried its true task (labelled)
    gate.tick(now)                              # about once a second (a background task): adds this
                                                # replica's counts to the shared state, runs the analysis
                                                # when due, and refreshes what assign() answers
"""
