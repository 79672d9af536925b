"""The services Serve's gRPC proxy exposes, registered so that undecodable request bytes reach our code.

Serve's proxy decodes each request with the `request_deserializer` of the handler it was registered
with, before any of our code runs. With the generated `add_*Servicer_to_server` functions that is the
message's `FromString`: a truncated message or invalid UTF-8 in a `string` field raises `DecodeError`
inside grpcio, and the client gets `UNKNOWN: Unexpected <class 'google.protobuf.message.DecodeError'>`.

`add_services_to_server` (named in `grpc_options.grpc_servicer_functions` of the Serve config)
registers the same services from their descriptors with a deserializer that never raises: bytes that
do not decode become an `UndecodableRequest`, which the proxy forwards to the Ingress like any other
request, and the Ingress answers it `INVALID_ARGUMENT` with a plain message (`health.ServingState.admit`).
No Serve internals are patched: this is the registration hook Serve documents, with our deserializer.

It also registers the standard `grpc.health.v1.Health` service (answered by the Ingress, so a probe
checks the whole path: proxy, Ingress, Router) and the token-checked `Admin` service (`serve_app/admin.py`).
Serve's proxy serves reflection for every registered service itself (`grpc_options.enable_reflection`,
on by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from protos.switchboard.v1 import admin_pb2, switchboard_pb2

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


def add_services_to_server(servicer: Any, server: Any) -> None:
    """Serve's servicer function: Switchboard, grpc.health.v1.Health and Admin (Serve routes all to the Ingress)."""
    for descriptor, service in SERVED:
        add_service(descriptor, service, servicer, server)
