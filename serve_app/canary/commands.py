"""The canary verbs, shared by `switchboard canary ...` and the Admin gRPC service (protos/.../admin.proto).

Each returns the JSON-able summary the caller prints or sends. The state file defaults to
`$SWITCHBOARD_HOME/canary/<app>.json`, the one the app's Router replicas use.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from routing.base_models import cache_root
from routing.catalog import Catalog

from ..config import catalog_switch
from ..contract import APP_NAME
from .policy import Policy, load_policy
from .state import Rollout, RolloutError, RolloutStore


def default_state_path(app: str = APP_NAME) -> Path:
    return cache_root() / "canary" / f"{app}.json"


def app_store(canary_state: str | None) -> RolloutStore:
    """The rollout state file every replica of the app shares (`AppArgs.canary_state`, else the default)."""
    return RolloutStore(canary_state or default_state_path())


def start(store: RolloutStore, candidate_dir: str | Path, policy: Policy | str | Path,
          stable_dir: str | Path | None = None, now: float | None = None) -> dict[str, Any]:
    """Begin a rollout of the candidate catalog against stable (by default: the last promoted candidate).

    `policy`: validated, or a policy file. The candidate is verified on disk (every file's hash: a changed
    byte or a missing adapter refuses it) and must share stable's base model and encoder, as an in-place
    switch needs; stable keeps serving.
    """
    policy = policy if isinstance(policy, Policy) else load_policy(policy)

    def begin(current: Rollout | None) -> Rollout:
        if current is not None and current.running:
            raise RolloutError(f"rollout {current.rollout_id} of {current.candidate['version']} is running "
                               f"(step {current.step}); promote, roll back or abort it first")
        stable_root = stable_dir or _served(current)
        stable = Catalog.load(stable_root, verify=False)
        candidate = Catalog.load(candidate_dir)   # verify: hashes of every file
        if catalog_switch({"catalog": str(candidate.root)}, stable) is None:
            raise RolloutError(f"the candidate {candidate.version} is the stable version: nothing to roll out")
        return Rollout.begin({"catalog": str(stable.root.resolve()), "version": stable.version},
                             {"catalog": str(candidate.root.resolve()), "version": candidate.version}, policy,
                             now=time.time() if now is None else now)

    return store.update(begin).summary()


def _served(previous: Rollout | None) -> str:
    if previous is None:
        raise RolloutError("no earlier rollout says which catalog is stable: give --stable DIR (the one the app serves)")
    return previous.candidate["catalog"] if previous.status.value == "promoted" else previous.stable["catalog"]


def status(store: RolloutStore) -> dict[str, Any]:
    rollout = store.load()
    if rollout is None:
        raise RolloutError(f"no rollout in {store.path}")
    return rollout.summary()


def command(store: RolloutStore, verb: str, now: float | None = None, rollout_id: str = "") -> dict[str, Any]:
    """promote (to the next step now) | rollback | abort; `rollout_id`, when given, must be the current one."""

    def apply(current: Rollout | None) -> Rollout:
        if current is None:
            raise RolloutError(f"no rollout in {store.path}")
        if rollout_id and rollout_id != current.rollout_id:
            raise RolloutError(f"rollout {rollout_id} is not the current one ({current.rollout_id}); look again")
        current.command(verb, time.time() if now is None else now)
        return current

    return store.update(apply).summary()
