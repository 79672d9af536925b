"""Canary rollouts of a candidate catalog version (a new selector, classifier, task index or adapter set).

- `policy`: the YAML policy (steps, minimum requests, checks), validated;
- `analysis`: the pure verdict (promote / hold / rollback) from per-version counters, with its numbers;
- `state`: the rollout state machine, the sticky split (`assign`) and the shared state file;
- `gate`: what Router and Ingress replicas call (below), and `commands`: what the CLI and the Admin service do.

Who calls the gate (`CanaryGate`, one per replica, on the app's state file):

    # Router (serve_app/router.py), per request
    version = gate.assign(session_key)          # "stable" | "candidate"; the request stays on it, Router to
                                                # Generator, and its reply names that catalog_version
    shadow = gate.shadowing()                   # True: answer on stable, and route on the candidate too,
                                                # off the latency path; then record(CANDIDATE, agreed=...)
    # Ingress (serve_app/ingress.py), per outcome
    gate.record(side_of(catalog_version), ok=..., latency_ms=..., correct=...)
                                                # correct: the request carried its true task (labelled);
                                                # gate.label(...) when it comes later, by Feedback
    # both, in a background task
    gate.tick(now)                              # about once a second: adds this replica's counts to the
                                                # shared state, runs the analysis when due, and refreshes
                                                # what assign() answers
"""
