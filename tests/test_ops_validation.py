"""Properties of request validation and decoding (hypothesis), and the client's retry, on a real gRPC server."""

from __future__ import annotations

import math
import threading
from concurrent import futures

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from protos.switchboard.v1 import switchboard_pb2 as pb
from routing.decision import MAX_TOP_K, TEMPERATURE_RANGE, RouteRequest
from serve_app.client import RetryPolicy, SwitchboardClient
from serve_app.health import DrainingError
from serve_app.ingress import _status_for
from serve_app.wire import UndecodableRequest, decode_or_mark

INT32 = st.integers(-(2**31), 2**31 - 1)
decode = decode_or_mark(pb.GenerateRequest)


@given(st.binary(max_size=256))
def test_any_bytes_decode_to_a_request_or_a_marker_never_an_exception(data):
    out = decode(data)
    assert isinstance(out, (pb.GenerateRequest, UndecodableRequest))
    if isinstance(out, UndecodableRequest):
        assert out.size == len(data) and "switchboard.v1.GenerateRequest" in out.explain()


@given(st.text(), st.text(), INT32, st.floats(width=32), INT32, st.lists(st.text(), max_size=3), st.booleans())
def test_every_message_a_client_can_send_decodes_to_itself(text, task, top_k, temperature, max_new, stop, base):
    sent = pb.GenerateRequest(text=text, route=pb.RouteOptions(task=task, top_k=top_k, temperature=temperature),
                              max_new_tokens=max_new, stop=stop, base_only=base)
    got = decode(sent.SerializeToString())
    assert isinstance(got, pb.GenerateRequest) and got.SerializeToString() == sent.SerializeToString()


@given(st.binary(min_size=1, max_size=64))
def test_a_truncated_message_is_never_mistaken_for_a_longer_text(tail):
    """Cutting a message short inside its text field is always caught, whatever the text's bytes."""
    body = bytes([0x0A, len(tail) + 1]) + tail   # field 1 (text) claims one byte more than is sent
    assert isinstance(decode(body), UndecodableRequest)


@settings(max_examples=300)
@given(st.text(max_size=50), INT32, st.floats(allow_nan=True, allow_infinity=True))
def test_route_request_accepts_exactly_the_documented_ranges(text, top_k, temperature):
    low, high = TEMPERATURE_RANGE
    valid = bool(text.strip()) and 1 <= top_k <= MAX_TOP_K and low <= temperature <= high
    try:
        request = RouteRequest(text, top_k=top_k, temperature=temperature)
    except ValueError:
        assert not valid
    else:
        assert valid and math.isfinite(request.temperature)


@pytest.mark.parametrize("exc, code", [
    (ActorDiedError(), grpc.StatusCode.UNAVAILABLE),
    (ActorUnavailableError("node lost", b"\x00" * 16), grpc.StatusCode.UNAVAILABLE),
    (DrainingError("draining"), grpc.StatusCode.UNAVAILABLE),
])
def test_lost_replicas_and_draining_are_retryable(exc, code):
    assert _status_for(exc)[0] == code
    wrapped = RayTaskError("generate", "traceback text", exc)   # as it arrives from another replica
    assert _status_for(wrapped)[0] == code


@given(st.integers(0, 30))
def test_backoff_stays_within_the_cap(attempt):
    policy = RetryPolicy(initial_s=0.1, max_s=2.0)
    assert 0 <= policy.backoff_s(attempt) <= min(2.0, 0.1 * 2**attempt)


def test_a_bad_retry_policy_is_refused():
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(attempts=0)


class FlakyHealth:
    """A real gRPC server whose Health answers UNAVAILABLE a given number of times, then SERVING."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.calls = failures, code, 0
        self.lock = threading.Lock()

    def __call__(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                context.abort(self.code, "replica restarting")
        return pb.HealthResponse(status="SERVING")


@pytest.fixture
def flaky_server():
    servers = []

    def start(handler: FlakyHealth) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(2))
        method = grpc.unary_unary_rpc_method_handler(handler, request_deserializer=pb.HealthRequest.FromString,
                                                     response_serializer=pb.HealthResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("switchboard.v1.Switchboard",
                                                                              {"Health": method}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_the_client_retries_unavailable_until_answered(flaky_server):
    handler = FlakyHealth(failures=3)
    with SwitchboardClient(flaky_server(handler), retry=RetryPolicy(initial_s=0.01, max_s=0.05)) as client:
        assert client.health().status == "SERVING"
    assert handler.calls == 4 and client.retries == 3


def test_the_client_gives_up_after_its_attempts_and_never_retries_other_codes(flaky_server):
    handler = FlakyHealth(failures=10)
    with SwitchboardClient(flaky_server(handler), retry=RetryPolicy(attempts=3, initial_s=0.01, max_s=0.05)) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.health()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and handler.calls == 3
    refused = FlakyHealth(failures=10, code=grpc.StatusCode.INVALID_ARGUMENT)
    with SwitchboardClient(flaky_server(refused), retry=RetryPolicy(initial_s=0.01)) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.health()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.calls == 1


def test_the_client_retries_within_its_timeout_only(flaky_server):
    """Retries stop at the call's deadline, not at the policy's attempts (waits are random: full jitter)."""
    import time

    handler = FlakyHealth(failures=1000)
    with SwitchboardClient(flaky_server(handler), timeout_s=0.5,
                           retry=RetryPolicy(attempts=1000, initial_s=0.2, max_s=0.2)) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError):
            client.health()
    assert time.monotonic() - started < 2.0 and 1 < handler.calls < 1000   # 1000 waits would take ~100 s
