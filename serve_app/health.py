"""What the Ingress says about itself: the standard gRPC health service, admission and draining.

`ServingState` is mixed into the Ingress deployment. It gives it

- `Check` / `List` / `Watch` of `grpc.health.v1.Health` (registered by `wire.add_services_to_server`),
  so `grpcurl`, `grpc_health_probe`, Kubernetes gRPC probes and load balancers work without our .proto.
  SERVING means the request went proxy -> Ingress -> Router and back; NOT_SERVING while draining
  or when the Router does not answer;
- `admit(request)`, entered around every Switchboard method: refuses undecodable bytes
  (INVALID_ARGUMENT) and, while draining, new requests (`DrainingError`, UNAVAILABLE: retry
  elsewhere), and counts the requests in flight so a drain knows when they are done;
- `reconfigure(user_config)`: `{"draining": true}` in the Ingress's Serve `user_config` reaches every
  Ingress replica without a restart; `launch.drain` sets it on SIGTERM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from .contract import BadRequestError
from .wire import UndecodableRequest

SERVICE = "switchboard.v1.Switchboard"
HEALTHY_NAMES = ("", SERVICE)   # "" is the whole server, by the protocol's convention
ROUTER_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 2.0

Status = health_pb2.HealthCheckResponse.ServingStatus


class DrainingError(RuntimeError):
    """The server is shutting down and takes no new requests (UNAVAILABLE: retry, another replica answers)."""


class ServingState:
    """Mixin for the Ingress: needs `self.router` (a handle with `info()`)."""

    draining: bool = False
    in_flight: int = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        unknown = sorted(set(user_config) - {"draining"})
        if unknown:
            raise ValueError(f"Ingress user_config: unknown keys {unknown}; only 'draining' (bool)")
        self.draining = bool(user_config.get("draining", False))

    @contextmanager
    def admit(self, request: Any) -> Iterator[None]:
        if isinstance(request, UndecodableRequest):
            raise BadRequestError(request.explain())
        if self.draining:
            raise DrainingError("the server is draining for shutdown; retry (another replica will answer)")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def serving_state(self) -> dict[str, Any]:
        """For `launch.drain`: is this replica draining, and how many requests has it still in flight."""
        return {"draining": self.draining, "in_flight": self.in_flight}

    async def _status(self, service: str) -> int | None:
        if service not in HEALTHY_NAMES:
            return None
        if self.draining:
            return Status.NOT_SERVING
        try:
            await asyncio.wait_for(self.router.info.remote(), ROUTER_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure to answer is "not serving", which is what a probe asks
            return Status.NOT_SERVING
        return Status.SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        if isinstance(request, UndecodableRequest):
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(request.explain())
            return health_pb2.HealthCheckResponse()
        status = await self._status(request.service)
        if status is None:   # the protocol: an unknown service is NOT_FOUND
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; this server has {SERVICE!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, grpc_context) -> health_pb2.HealthListResponse:
        status = await self._status(SERVICE)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name in HEALTHY_NAMES})

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (polled); SERVICE_UNKNOWN for a name this server lacks."""
        last = None
        while True:
            status = await self._status(getattr(request, "service", None))
            status = Status.SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)
