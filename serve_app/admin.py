"""The `Admin` gRPC service (protos/switchboard/v1/admin.proto): the `switchboard canary` verbs on a running app.

Served by the Ingress on Serve's gRPC port, beside Switchboard (`wire.SERVED`). Every call must carry the
app's `admin_token` (or, when the args have none, $SWITCHBOARD_ADMIN_TOKEN of the replica's process: on
KubeRay, a Secret in the pod's env rather than the token in the RayService) as `authorization: Bearer
<token>`: none is UNAUTHENTICATED, another PERMISSION_DENIED, and an app with neither refuses every call
PERMISSION_DENIED, saying so. The verbs themselves are
`serve_app.canary.commands`, the same functions the CLI runs on a state file; `AdminClient` is the CLI's
`--endpoint` side.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from protos.switchboard.v1 import admin_pb2 as apb
from protos.switchboard.v1 import admin_pb2_grpc as apb_grpc

from .canary import commands
from .canary.policy import parse_policy
from .canary.state import RolloutError, RolloutStore
from .contract import APP_NAME
from .wire import UndecodableRequest

TOKEN_ENV = "SWITCHBOARD_ADMIN_TOKEN"


def refusal(metadata: tuple[tuple[str, str], ...] | list, configured: str | None) -> tuple[grpc.StatusCode, str] | None:
    """Why a caller with `metadata` may not use Admin (code, message), or None when it may."""
    if not configured:
        return grpc.StatusCode.PERMISSION_DENIED, ("the Admin service is off: this app has no admin_token in its "
                                                   "args (set one in the Serve config to drive canaries over gRPC)")
    sent = [v for k, v in metadata if k.lower() == "authorization"]
    if not sent or not sent[0].startswith("Bearer ") or not sent[0][len("Bearer "):]:
        return grpc.StatusCode.UNAUTHENTICATED, "send the app's admin token as metadata `authorization: Bearer <token>`"
    if not hmac.compare_digest(sent[0][len("Bearer "):].encode(), configured.encode()):
        return grpc.StatusCode.PERMISSION_DENIED, "wrong admin token"
    return None


def status_pb(summary: dict[str, Any]) -> apb.CanaryStatus:
    """A rollout summary (`Rollout.summary`) as the service's message."""
    step_name = lambda s: s if isinstance(s, str) else f"{s:g}"  # noqa: E731
    last = summary.get("last_decision")
    decision = None
    if last:
        decision = apb.CanaryDecision(at=last["at"], by=last["by"], action=last["action"], step=last["step"],
                                      reason=last.get("reason", ""),
                                      measurements=[apb.Measurement(**m) for m in last.get("measurements", [])])
    return apb.CanaryStatus(rollout_id=summary["rollout_id"], status=summary["status"], step=summary["step"],
                            steps=[step_name(s) for s in summary["steps"]], weight=summary["weight"],
                            shadow=summary["shadow"], stable=apb.CatalogRef(**summary["stable"]),
                            candidate=apb.CatalogRef(**summary["candidate"]),
                            candidate_requests=summary["candidate_requests"],
                            candidate_compared=summary["candidate_compared"], last_decision=decision)


def _code_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, RolloutError):   # before ValueError: a verb that does not apply now
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError)):   # bad policy, candidate refused
        return grpc.StatusCode.INVALID_ARGUMENT
    raise exc


class AdminService:
    """Mixin for the Ingress: needs `self.cfg` (AppArgs) and `self.canary` (the app's RolloutStore)."""

    cfg: Any
    canary: RolloutStore

    async def _admin(self, request: Any, grpc_context, verb: Callable[[], dict[str, Any]]) -> apb.CanaryStatus:
        refused = (grpc.StatusCode.INVALID_ARGUMENT, request.explain()) if isinstance(request, UndecodableRequest) \
            else refusal(grpc_context.invocation_metadata(), self.cfg.admin_token or os.environ.get(TOKEN_ENV))
        if refused is None:
            try:
                return status_pb(await asyncio.to_thread(verb))
            except Exception as e:  # noqa: BLE001 - mapped to a status code, or re-raised (INTERNAL) by _code_of
                refused = _code_of(e), str(e)
        grpc_context.set_code(refused[0])
        grpc_context.set_details(refused[1])
        return apb.CanaryStatus()

    async def StartCanary(self, request: apb.StartCanaryRequest, grpc_context) -> apb.CanaryStatus:
        def start() -> dict[str, Any]:
            policy = parse_policy(request.policy_yaml, "policy_yaml")
            stable = None if self.canary.load() is not None else self.cfg.catalog   # first rollout: the app's
            return commands.start(self.canary, request.catalog, policy, stable)
        return await self._admin(request, grpc_context, start)

    async def GetCanary(self, request: apb.GetCanaryRequest, grpc_context) -> apb.CanaryStatus:
        return await self._admin(request, grpc_context, lambda: commands.status(self.canary))

    async def PromoteCanary(self, request: apb.CanaryCommand, grpc_context) -> apb.CanaryStatus:
        return await self._admin(request, grpc_context,
                                 lambda: commands.command(self.canary, "promote", rollout_id=request.rollout_id))

    async def RollbackCanary(self, request: apb.CanaryCommand, grpc_context) -> apb.CanaryStatus:
        return await self._admin(request, grpc_context,
                                 lambda: commands.command(self.canary, "rollback", rollout_id=request.rollout_id))

    async def AbortCanary(self, request: apb.CanaryCommand, grpc_context) -> apb.CanaryStatus:
        return await self._admin(request, grpc_context,
                                 lambda: commands.command(self.canary, "abort", rollout_id=request.rollout_id))


class AdminClient:
    """`switchboard canary ... --endpoint HOST:PORT`: the verbs over gRPC; each returns the status as a dict."""

    def __init__(self, address: str, token: str, application: str = APP_NAME, timeout_s: float = 60):
        self.channel = grpc.insecure_channel(address)
        self.stub = apb_grpc.AdminStub(self.channel)
        self.metadata = (("application", application), ("authorization", f"Bearer {token}"))
        self.timeout_s = timeout_s

    def _call(self, method, request) -> dict[str, Any]:
        reply = method(request, metadata=self.metadata, timeout=self.timeout_s)
        return json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                           always_print_fields_with_no_presence=True)

    def start(self, catalog: str, policy_yaml: str) -> dict[str, Any]:
        return self._call(self.stub.StartCanary, apb.StartCanaryRequest(catalog=catalog, policy_yaml=policy_yaml))

    def status(self) -> dict[str, Any]:
        return self._call(self.stub.GetCanary, apb.GetCanaryRequest())

    def command(self, verb: str, rollout_id: str = "") -> dict[str, Any]:
        method = {"promote": self.stub.PromoteCanary, "rollback": self.stub.RollbackCanary,
                  "abort": self.stub.AbortCanary}[verb]
        return self._call(method, apb.CanaryCommand(rollout_id=rollout_id))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
