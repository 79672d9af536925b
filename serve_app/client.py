"""A small gRPC client for the Switchboard service.

    with SwitchboardClient("127.0.0.1:9000") as sb:
        reply = sb.generate("Shares of Acme (ACM) rose ...", top_k=3)
        print(reply.text, [(t.task, t.weight) for t in reply.decision.tasks])
        for chunk in sb.generate_stream("Shares of Acme (ACM) rose ...", max_new_tokens=64):
            print(chunk.text, end="", flush=True)   # the last chunk carries finish_reason and the decision

`routing_temperature` is the routing softmax's τ (how K fused adapters are weighted);
`sampling_temperature` is the sampling temperature of the answer (0 = greedy).

Calls that fail with UNAVAILABLE (a replica killed mid-request, a node lost, the server draining or
restarting, no connection yet) are retried with exponential backoff and jitter, within the call's
timeout: every method here is read-only, so a retry cannot do anything twice. Other codes are the
request's fault or final and are raised at once. A stream is not retried (its error can come after
chunks were read): `generate_stream` raises what its call ends with.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from protos.switchboard.v1 import switchboard_pb2 as pb
from protos.switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from .contract import APP_NAME


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE: waits of `initial_s` x `multiplier`^n, capped at `max_s`, full jitter.

    The defaults cover a Serve replica restart (about 5 s here) within their 8 attempts.
    """

    attempts: int = 8
    initial_s: float = 0.2
    max_s: float = 3.0
    multiplier: float = 2.0
    retryable: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_s < 0 or self.max_s < self.initial_s or self.multiplier < 1:
            raise ValueError(f"retry policy: need attempts >= 1 and 0 <= initial_s <= max_s, multiplier >= 1: {self}")

    def backoff_s(self, attempt: int) -> float:
        """How long to wait after the failed attempt number `attempt` (0-based)."""
        return random.uniform(0, min(self.max_s, self.initial_s * self.multiplier ** attempt))


NO_RETRY = RetryPolicy(attempts=1)


class SwitchboardClient:
    def __init__(self, address: str = "127.0.0.1:9000", application: str = APP_NAME, timeout_s: float = 120,
                 retry: RetryPolicy = RetryPolicy()):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.SwitchboardStub(self.channel)
        # Serve's gRPC proxy picks the application by this metadata key.
        self.metadata = (("application", application),)
        self.timeout_s = timeout_s
        self.retry = retry
        self.retries = 0   # how many calls were retried since the client was made (benchmarks report it)

    def _call(self, method, request):
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            try:
                return method(request, metadata=self.metadata, timeout=max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as e:
                wait = self.retry.backoff_s(attempt)
                attempt += 1
                if (e.code() not in self.retry.retryable or attempt >= self.retry.attempts
                        or time.monotonic() + wait >= deadline):
                    raise
            self.retries += 1
            time.sleep(wait)

    def generate(self, text: str, **options) -> pb.GenerateResponse:
        """The whole answer. Options: router, task, top_k, routing_temperature, max_new_tokens, stop,
        base_only, sampling_temperature, top_p, seed, session_key, true_task (see `generate_request`)."""
        return self._call(self.stub.Generate, generate_request(text, **options))

    def generate_stream(self, text: str, **options) -> Iterator[pb.GenerateChunk]:
        """The answer as it is made: chunks of new text, the last one with finish_reason, the route
        decision, token counts and timings. Same options as `generate`."""
        return self._call(self.stub.GenerateStream, generate_request(text, **options))

    def route(self, text: str, *, router: str = "", task: str = "", top_k: int = 0, routing_temperature: float = 0.0,
              session_key: str = "", true_task: str = "") -> pb.RouteResponse:
        route = pb.RouteOptions(router=router, task=task, top_k=top_k, temperature=routing_temperature,
                                session_key=session_key, true_task=true_task)
        return self._call(self.stub.Route, pb.RouteRequest(text=text, route=route))

    def feedback(self, request_id: str, true_task: str) -> pb.FeedbackResponse:
        """The true task of an earlier reply (its `request_id`): labelled traffic for the canary and metrics."""
        return self._call(self.stub.Feedback, pb.FeedbackRequest(request_id=request_id, true_task=true_task))

    def list_tasks(self) -> pb.ListTasksResponse:
        return self._call(self.stub.ListTasks, pb.ListTasksRequest())

    def health(self) -> pb.HealthResponse:
        return self._call(self.stub.Health, pb.HealthRequest())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SwitchboardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_request(text: str, *, router: str = "", task: str = "", top_k: int = 0, routing_temperature: float = 0.0,
                     max_new_tokens: int = 0, stop: list[str] | None = None, base_only: bool = False,
                     sampling_temperature: float = 0.0, top_p: float = 0.0, seed: int | None = None,
                     session_key: str = "", true_task: str = "") -> pb.GenerateRequest:
    """A `GenerateRequest`; zeros mean the server's defaults (greedy sampling). `session_key`: sticky side of a
    canary split; `true_task`: labelled traffic (see the .proto)."""
    route = pb.RouteOptions(router=router, task=task, top_k=top_k, temperature=routing_temperature,
                            session_key=session_key, true_task=true_task)
    sampling = pb.Sampling(temperature=sampling_temperature, top_p=top_p, seed=seed)
    return pb.GenerateRequest(text=text, route=route, max_new_tokens=max_new_tokens, stop=stop or [],
                              base_only=base_only, sampling=sampling)
