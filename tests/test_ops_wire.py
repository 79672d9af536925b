"""Over the wire, on the real Serve app: the bad-input corpus, grpc.health.v1, reflection, replica death.

Every item of the corpus is sent as a real gRPC client would send it (raw bytes for what a well-behaved
client cannot produce), gets one precise status code and a plain message (no traceback, no Python
class name), and the server answers a good request and its health check afterwards.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.switchboard.v1 import switchboard_pb2 as pb
from serve_app import launch
from serve_app.client import NO_RETRY, RetryPolicy, SwitchboardClient

KEYS = ("fin/sentiment", "med/dose")
TEXT = "The patient weighs 7 kg."
METADATA = (("application", "switchboard"),)


@pytest.fixture(scope="module")
def app(small_catalog, free_port):
    catalog = small_catalog
    port = free_port()
    config = launch.load_config(args={"catalog": str(catalog.root), "max_new_tokens": 4}, grpc_port=port,
                                http_port=free_port())
    launch.start(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                SwitchboardClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            yield SimpleNamespace(channel=channel, client=client, port=port, catalog=catalog, config=config)
    finally:
        launch.stop()


def raw(channel: grpc.Channel, method: str, body: bytes, timeout: float = 60) -> bytes:
    """Send bytes as they are: what a broken or hostile client can put on the wire."""
    call = channel.unary_unary(f"/switchboard.v1.Switchboard/{method}", request_serializer=None,
                               response_deserializer=None)
    return call(body, metadata=METADATA, timeout=timeout)


def _string_field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


VALID = pb.GenerateRequest(text=TEXT, max_new_tokens=2).SerializeToString()

# name -> (what to send, expected code, a phrase of the message or None)
CORPUS = {
    "empty text": (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    "whitespace text": (dict(text=" \t\n "), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    "1 MB text": (dict(text="word " * 200_000), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    "NUL bytes": (dict(text="dose\x00 of 7\x00 mg"), grpc.StatusCode.OK, None),
    "NaN temperature": (dict(temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be in"),
    "infinite temperature": (dict(temperature=math.inf), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be in"),
    "negative top_k": (dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "must not be negative"),
    "huge top_k": (dict(top_k=2**31 - 1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "negative max_new_tokens": (dict(max_new_tokens=-5), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    "huge max_new_tokens": (dict(max_new_tokens=2**31 - 1), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    "unknown router": (dict(router="oracle"), grpc.StatusCode.INVALID_ARGUMENT, "unknown router"),
    "unknown task": (dict(task="fin/nope"), grpc.StatusCode.NOT_FOUND, "fin/nope"),
    "path traversal task": (dict(task="../../../etc/passwd"), grpc.StatusCode.NOT_FOUND, "etc/passwd"),
    "path traversal task, absolute": (dict(task="/etc/passwd"), grpc.StatusCode.NOT_FOUND, "etc/passwd"),
    "invalid UTF-8 in text": (_string_field(1, b"dose \xff\xfe of 7"), grpc.StatusCode.INVALID_ARGUMENT,
                              "is not a valid switchboard.v1.GenerateRequest"),
    "invalid UTF-8 in a nested task": (_string_field(2, _string_field(2, b"fin/\xc3")),
                                       grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
    "truncated protobuf": (VALID[:-3], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "garbage bytes": (b"\xff" * 16, grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
}


def _send(app, what) -> tuple[grpc.StatusCode, str]:
    if isinstance(what, bytes):
        body = what
    else:
        route = pb.RouteOptions(**{k: what[k] for k in ("router", "task", "top_k", "temperature") if k in what})
        body = pb.GenerateRequest(text=what.get("text", TEXT), route=route, max_new_tokens=what.get("max_new_tokens", 2)
                                  ).SerializeToString()
    try:
        pb.GenerateResponse.FromString(raw(app.channel, "Generate", body))
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def _plain(details: str) -> bool:
    return not any(s in details for s in ("Traceback", "<class", 'File "', "DecodeError", "ray."))


@pytest.mark.parametrize("name", CORPUS)
def test_bad_input_gets_a_precise_status_and_a_plain_message(app, name):
    what, code, phrase = CORPUS[name]
    got, details = _send(app, what)
    assert got == code, (name, got, details)
    assert phrase is None or phrase in details, details
    assert _plain(details), details


def test_unknown_method_and_short_deadline(app):
    call = app.channel.unary_unary("/switchboard.v1.Switchboard/Nope", request_serializer=None,
                                   response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        call(VALID, metadata=METADATA, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as err:
        raw(app.channel, "Generate", VALID, timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_server_is_healthy_after_the_whole_corpus_at_once(app):
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda name: _send(app, CORPUS[name][0])[0], list(CORPUS) * 2))
    assert codes == [CORPUS[name][1] for name in list(CORPUS) * 2]
    health = health_pb2_grpc.HealthStub(app.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    assert app.client.generate(TEXT, max_new_tokens=2).new_tokens >= 1


def test_standard_health_protocol(app):
    """What grpc_health_probe and a Kubernetes gRPC probe send: no metadata, the standard service."""
    health = health_pb2_grpc.HealthStub(app.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service="switchboard.v1.Switchboard"),
                        timeout=30).status == serving
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    statuses = health.List(health_pb2.HealthListRequest(), timeout=30).statuses
    assert {k: v.status for k, v in statuses.items()} == {"": serving, "switchboard.v1.Switchboard": serving}
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == serving
    watch.cancel()


def test_server_reflection_lists_and_describes_our_services(app):
    """What grpcurl does without our .proto: list the services, then fetch a method's types."""
    db = ProtoReflectionDescriptorDatabase(app.channel)
    services = set(db.get_services())
    assert {"switchboard.v1.Switchboard", "grpc.health.v1.Health"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    generate = DescriptorPool(db).FindServiceByName("switchboard.v1.Switchboard").methods_by_name["Generate"]
    assert generate.input_type.fields_by_name["text"].number == 1


def test_a_killed_generator_replica_costs_no_request(app):
    """SIGKILL-equivalent `ray.kill` of the Generator replica under 16 clients: each call is answered,
    the ones on the dead replica after UNAVAILABLE and the client's retry, and Serve brings one back."""
    import ray

    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "#Generator#" in a["name"]]
    with SwitchboardClient(f"127.0.0.1:{app.port}", retry=RetryPolicy(attempts=12, max_s=2.0)) as client:
        def send(i: int) -> int:
            return client.generate(f"{TEXT} Case {i}.", max_new_tokens=4, task=KEYS[i % 2]).new_tokens

        with ThreadPoolExecutor(16) as pool:
            pending = [pool.submit(send, i) for i in range(96)]
            time.sleep(1.0)
            ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
            answered = [f.result() for f in pending]
        assert len(answered) == 96 and all(n >= 1 for n in answered)
        assert client.retries >= 1   # some requests were on the replica when it died
