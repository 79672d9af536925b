"""The services Serve's gRPC proxy exposes, registered so that undecodable request bytes reach our code.

Serve's proxy decodes each request with the `request_deserializer` of the handler it was registered
with, before any of our code runs. With the generated `add_*Servicer_to_server` functions that is the
message's `FromString`: a truncated message or invalid UTF-8 in a `string` field raises `DecodeError`
inside grpcio, and the client gets `UNKNOWN: Unexpected <class 'google.protobuf.message.DecodeError'>`.

`add_services_to_server` (named in `grpc_options.grpc_servicer_functions` of the Serve config)
registers the same services from their descriptors with a deserializer that never raises: bytes that
do not decode become an `UndecodableRequest`, which the proxy forwards to the Ingress like any other
request, and the Ingress answers it `INVALID_ARGUMENT` with a plain message (`health.ServingState.admit`).
This is the registration hook Serve documents, with our deserializer.

It also registers the standard `grpc.health.v1.Health` service (answered by the Ingress, so a probe
checks the whole path: proxy, Ingress, Router) and the token-checked `Admin` service (`serve_app/admin.py`).
Serve's proxy serves reflection for every registered service itself (`grpc_options.enable_reflection`,
on by default).

Serve's proxy loses some client cancellations of server-streaming calls (`cancel_downstream`); the
servicer function also wraps the handlers Serve makes for them, so that every cancel reaches the
Generator and frees the sequence's slot.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from protos.switchboard.v1 import admin_pb2, switchboard_pb2

log = logging.getLogger("ray.serve")

SERVED: tuple[tuple[FileDescriptor, str], ...] = (
    (switchboard_pb2.DESCRIPTOR, "Switchboard"),
    (health_pb2.DESCRIPTOR, "Health"),
    (admin_pb2.DESCRIPTOR, "Admin"),
)


@dataclass(frozen=True)
class UndecodableRequest:
    """Request bytes that are not a valid message of the method's input type (answered INVALID_ARGUMENT)."""

    message_type: str
    size: int
    reason: str

    def explain(self) -> str:
        return (f"the request body ({self.size} bytes) is not a valid {self.message_type}: {self.reason} "
                f"(a truncated message, or a string field that is not UTF-8)")


def decode_or_mark(message_class: type) -> Callable[[bytes], Any]:
    """A request deserializer that returns an `UndecodableRequest` instead of raising."""
    name = message_class.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return UndecodableRequest(name, len(data), str(e) or "does not parse")

    return decode


def _handler(method: MethodDescriptor, behaviour: Callable) -> grpc.RpcMethodHandler:
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[method.client_streaming, method.server_streaming]
    return kind(behaviour, request_deserializer=decode_or_mark(request),
                response_serializer=response.SerializeToString)


def add_service(descriptor: FileDescriptor, service: str, servicer: Any, server: Any) -> None:
    """Register one service of a .proto file, as its generated `add_*_to_server` would, with our deserializer."""
    svc = descriptor.services_by_name[service]
    handlers = {m.name: _handler(m, getattr(servicer, m.name)) for m in svc.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(svc.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):   # grpcio >= 1.62
        server.add_registered_method_handlers(svc.full_name, handlers)


def cancel_downstream(stream: Callable[..., AsyncIterator[Any]]) -> Callable[..., Awaitable[None]]:
    """A server-streaming handler that writes each chunk itself while the next is fetched in a task of its
    own, and interrupts that fetch when the client cancels.

    Serve's proxy cancels the request behind a stream only when the client's cancel interrupts it while
    it awaits the replica's next chunk. A cancel that lands while grpc writes a chunk is lost, and the
    Ingress and the Generator make the whole answer for nobody (3 cancels of 65 on a token stream here;
    ray-project/ray#42665 was closed unmerged). Here a cancel that lands on a write is passed to the
    fetch in flight, where Serve acts on it. Serve then winds the request down (its status, its access
    log, which reads the call's peer) before this handler returns: once grpc has dropped the call, that
    read crashes the proxy."""

    @functools.wraps(stream)
    async def handler(request: Any, context: Any) -> None:
        chunks = stream(request, context)
        pending = asyncio.ensure_future(anext(chunks))
        try:
            while True:
                try:
                    chunk = await pending
                except StopAsyncIteration:
                    return
                pending = asyncio.ensure_future(anext(chunks))
                await context.write(chunk)
        except asyncio.CancelledError:
            if pending.done():   # a chunk already fetched: ask for the next, which waits on the replica
                pending = asyncio.ensure_future(anext(chunks))
            await asyncio.sleep(0)   # a fetch is interrupted where it awaits, not before it starts
            pending.cancel()
            await asyncio.wait([pending])
            raise

    return handler


def _cancelling(factory: Callable[..., Callable]) -> Callable[..., Callable]:
    """Serve's handler factory with its server-streaming handlers wrapped in `cancel_downstream`."""

    def make(service_method: str, streaming_type: Any) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        return cancel_downstream(handler) if streaming_type == "unary_stream" else handler

    make.cancels_downstream = True  # type: ignore[attr-defined]
    return make


def add_services_to_server(servicer: Any, server: Any) -> None:
    """Serve's servicer function: Switchboard, grpc.health.v1.Health and Admin (Serve routes all to the Ingress).

    Serve makes each method's handler with the factory it gave the server (`service_handler_factory`);
    it is wrapped first, once, so that streams pass client cancellations on (`cancel_downstream`)."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        log.warning("wire: this Serve's gRPC server has no service_handler_factory; a cancelled stream may "
                    "run to its end")
    elif not getattr(factory, "cancels_downstream", False):
        server.service_handler_factory = _cancelling(factory)
    for descriptor, service in SERVED:
        add_service(descriptor, service, servicer, server)
