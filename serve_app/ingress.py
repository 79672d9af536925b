"""The gRPC servicer: validates requests, asks the Router, then the Generator; maps errors to status codes.

Method names match `protos/switchboard/v1/switchboard.proto`; Serve's gRPC proxy calls them with the
request message and a `grpc_context`. No exception escapes to the client as a traceback: bad input
is INVALID_ARGUMENT, an unknown task NOT_FOUND, a request caught in a catalog switch UNAVAILABLE
(retry), anything else INTERNAL with a request id to look up
in the replica's log. Only errors that are the client's (`BadRequestError`) are INVALID_ARGUMENT; Serve
saying no replica can take the request now (back-pressure, replicas down) is UNAVAILABLE (retry).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from protos.switchboard.v1 import switchboard_pb2 as pb
from routing.decision import RouteDecision, RouteRequest, UnknownTaskError

from .admin import AdminService
from .canary.commands import app_store
from .canary.gate import CanaryGate
from .config import MAX_NEW_TOKENS_LIMIT, MAX_SAMPLING_TEMPERATURE, AppArgs
from .contract import (Answer, BadRequestError, CatalogChangedError, Delta, GenerationJob, NoAdapterError,
                       OverloadedError)
from .health import DrainingError, ServingState
from .metrics import SERVE_METRICS
from .openai_api import OpenAIRoutes, http

log = logging.getLogger("ray.serve")


# Codes that count as the serving version's failure (the rest are the client's, or back-pressure).
SERVER_ERRORS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.DATA_LOSS})


class UnknownRequestError(LookupError):
    """Feedback about a request id this server did not issue (NOT_FOUND)."""


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, (UnknownTaskError, UnknownRequestError)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (CatalogChangedError, DrainingError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    # A replica that died (SIGKILL, its node lost) or cannot be reached now is the server's transient
    # state, not the request's fault: Serve restarts it, and the client's retry is answered.
    if isinstance(exc, RayActorError):   # ActorDiedError, ActorUnavailableError
        return grpc.StatusCode.UNAVAILABLE, f"a server replica was lost mid-request; retry ({type(exc).__name__})"
    if isinstance(exc, (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, f"the server is busy or restarting; retry ({type(exc).__name__})"
    if isinstance(exc, BadRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NoAdapterError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    return None


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `exc`; an unexpected error is logged with a
    reference and reaches the client as INTERNAL with that reference only."""
    mapped = _status_for(exc)
    if mapped is None:
        ref = uuid.uuid4().hex[:12]
        log.error("request %s failed", ref, exc_info=exc)
        mapped = grpc.StatusCode.INTERNAL, f"internal error (reference {ref} in the server log)"
    return mapped


def grpc_errors(empty_response: type):
    """Turn exceptions into gRPC status codes and an empty response of the method's type."""

    def wrap(method):
        @functools.wraps(method)
        async def call(self, request, grpc_context):
            try:
                with self.admit(request):
                    return await method(self, request, grpc_context)
            except Exception as exc:  # noqa: BLE001 - the boundary where every error becomes a status
                code, details = status_of(exc)
                grpc_context.set_code(code)
                grpc_context.set_details(details)
                return empty_response()

        return call

    return wrap


def grpc_stream_errors(method):
    """The same for a server-streaming method: the chunks sent so far stand, then the status. Serve applies
    a code set on the context when the method raises (`gRPCStatusError`), so the error is re-raised with
    only the mapped message (never a traceback) as its text."""

    @functools.wraps(method)
    async def call(self, request, grpc_context):
        try:
            with self.admit(request):
                async for chunk in method(self, request, grpc_context):
                    yield chunk
        except Exception as exc:  # noqa: BLE001 - the boundary where every error becomes a status
            code, details = status_of(exc)
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            raise StreamFailed(details) from None

    return call


class StreamFailed(RuntimeError):
    """Ends a stream with the status set on its context."""


def _decision_pb(d: RouteDecision) -> pb.RouteDecision:
    scores = d.scores or (0.0,) * len(d.tasks)
    return pb.RouteDecision(tasks=[pb.TaskWeight(task=k, weight=w, score=s) for (k, w), s in zip(d.tasks, scores)],
                            router=d.router, catalog_version=d.catalog_version)


MAX_SESSION_KEY = 256


def issue_request_id(decision: RouteDecision, rollout: tuple[str, int] | None) -> str:
    """A reply's request id: a nonce, and what a later Feedback needs (version, top-1 task, the rollout step it
    was counted under), so that any Ingress replica can credit it without a shared table."""
    facts = [decision.catalog_version, decision.top, *(rollout or ("", -1))]
    return f"{uuid.uuid4().hex[:16]}.{base64.urlsafe_b64encode(json.dumps(facts).encode()).decode()}"


def read_request_id(request_id: str) -> tuple[str, str, tuple[str, int] | None]:
    """(catalog version, top-1 task, rollout step or None) of an id `issue_request_id` made; LookupError else."""
    try:
        version, top, rollout_id, step = json.loads(base64.urlsafe_b64decode(request_id.split(".", 1)[1]))
        return str(version), str(top), (str(rollout_id), int(step)) if rollout_id else None
    except (IndexError, ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise LookupError(f"request_id {request_id[:80]!r} was not issued by this server") from None


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024)
@serve.ingress(http)
class Ingress(ServingState, AdminService, OpenAIRoutes):
    """gRPC (the methods named as in the .proto, the standard health service from `ServingState`, the
    token-checked `Admin` service from `AdminService`) and OpenAI-compatible HTTP (`OpenAIRoutes`) in one
    deployment. It counts every request's outcome for the catalog version that answered it: into the
    canary's shared state (`CanaryGate`, synced about once a second) and into Serve metrics."""

    def __init__(self, args: dict, router: DeploymentHandle, generator: DeploymentHandle):
        self.cfg = AppArgs(**args)
        self.router = router
        self.generator = generator
        self.canary = app_store(self.cfg.canary_state)
        self.gate = CanaryGate(self.canary)
        self.syncing: asyncio.Task | None = None

    async def _sync_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.gate.tick)
            except Exception:  # noqa: BLE001 - counting must never stop serving
                log.exception("canary: sync of the Ingress's counts failed")
            await asyncio.sleep(self.gate.sync_s)

    def _rollout_step(self) -> tuple[str, int] | None:
        r = self.gate.rollout
        return (r.rollout_id, r.step) if r is not None and r.running else None

    @contextmanager
    def outcome(self, method: str, decision: RouteDecision, true_task: str, started: float) -> Iterator[str]:
        """Count the request (answered or failed, and how long it took) for the version that routed it; yields
        its request id. Only a server error counts against the version; a client's mistake does not."""
        side = self.gate.side_of(decision.catalog_version)
        code = grpc.StatusCode.OK
        try:
            yield issue_request_id(decision, self._rollout_step())
        except (asyncio.CancelledError, GeneratorExit):   # the client went away (a stream closed, a deadline)
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = (_status_for(exc) or (grpc.StatusCode.INTERNAL, ""))[0]
            raise
        finally:
            latency_ms = 1000 * (time.perf_counter() - started)
            ok = code not in SERVER_ERRORS
            correct = decision.top == true_task if true_task and ok else None
            if side is not None:
                self.gate.record(side, ok=ok, latency_ms=latency_ms, correct=correct)
            SERVE_METRICS.request(method, decision.catalog_version, side or "none", decision.top, code.name, latency_ms)
            if correct is not None:
                SERVE_METRICS.label(decision.catalog_version, side or "none", correct)

    async def _route(self, text: str, opts: pb.RouteOptions) -> tuple[RouteDecision, float]:
        if self.syncing is None:
            self.syncing = asyncio.get_running_loop().create_task(self._sync_forever())
        if opts.top_k < 0 or opts.temperature < 0:
            raise BadRequestError("top_k and temperature must not be negative")
        if len(opts.session_key) > MAX_SESSION_KEY:
            raise BadRequestError(f"route.session_key is longer than {MAX_SESSION_KEY} characters")
        if opts.top_k > self.cfg.max_loras:
            raise BadRequestError(f"top_k {opts.top_k}: this server fuses at most {self.cfg.max_loras} adapters")
        try:
            request = RouteRequest(text, top_k=opts.top_k or self.cfg.default_top_k,
                                   temperature=opts.temperature or self.cfg.temperature, task=opts.task or None)
        except ValueError as e:
            raise BadRequestError(str(e)) from None
        name = opts.router or ("fixed" if opts.task else self.cfg.default_router)
        if name == "fixed" and not opts.task:
            raise BadRequestError("the fixed router needs route.task")
        if name != "fixed" and opts.task:   # silently routing elsewhere would hide the client's mistake
            raise BadRequestError(f"route.task is for the fixed router; router {name!r} picks the task from the text "
                             f"(leave route.router empty or set it to 'fixed')")
        started = time.perf_counter()
        decision = await self.router.route.remote(request, name, opts.session_key or None, opts.true_task or None)
        route_ms = 1000 * (time.perf_counter() - started)
        SERVE_METRICS.route(decision.catalog_version, self.gate.side_of(decision.catalog_version) or "none",
                            decision.router, route_ms)
        return decision, route_ms

    async def _job(self, request: pb.GenerateRequest) -> tuple[GenerationJob, RouteDecision, float]:
        if not 0 <= request.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise BadRequestError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS_LIMIT} (0 = default)")
        sampling = request.sampling
        if not (math.isfinite(sampling.temperature) and 0 <= sampling.temperature <= MAX_SAMPLING_TEMPERATURE):
            raise BadRequestError(f"sampling.temperature must be in [0, {MAX_SAMPLING_TEMPERATURE:g}] (0 = greedy), "
                                  f"got {sampling.temperature}")
        if not (math.isfinite(sampling.top_p) and 0 <= sampling.top_p <= 1):
            raise BadRequestError(f"sampling.top_p must be in (0, 1] (0 = 1), got {sampling.top_p}")
        decision, route_ms = await self._route(request.text, request.route)
        job = GenerationJob(request.text, decision, request.max_new_tokens or self.cfg.max_new_tokens,
                            tuple(s for s in request.stop if s), request.base_only,
                            temperature=sampling.temperature, top_p=sampling.top_p or 1.0,
                            seed=sampling.seed if sampling.HasField("seed") else None)
        return job, decision, route_ms

    @grpc_errors(pb.GenerateResponse)
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        arrived = time.perf_counter()
        job, decision, route_ms = await self._job(request)
        with self.outcome("Generate", decision, request.route.true_task, arrived) as request_id:
            started = time.perf_counter()
            out: Answer = await self.generator.generate.remote(job)
        return pb.GenerateResponse(text=out.text, decision=_decision_pb(decision), new_tokens=out.new_tokens,
                                   finish_reason=out.finish_reason, route_ms=route_ms,
                                   generate_ms=1000 * (time.perf_counter() - started),
                                   prompt_tokens=out.prompt_tokens, ttft_ms=out.ttft_ms, request_id=request_id)

    @grpc_stream_errors
    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateChunk]:
        arrived = time.perf_counter()
        job, decision, route_ms = await self._job(request)
        with self.outcome("GenerateStream", decision, request.route.true_task, arrived) as request_id:
            async for item in self.stream(job):
                if isinstance(item, Delta):
                    yield pb.GenerateChunk(text=item.text)
                else:
                    yield pb.GenerateChunk(finish_reason=item.finish_reason, decision=_decision_pb(decision),
                                           prompt_tokens=item.prompt_tokens, new_tokens=item.new_tokens,
                                           route_ms=route_ms, ttft_ms=item.ttft_ms, total_ms=item.total_ms,
                                           request_id=request_id)

    def stream(self, job: GenerationJob) -> AsyncIterator[Delta | Answer]:
        """The Generator's stream of `job` (its `Delta`s, then the `Answer`)."""
        return self.generator.options(stream=True).stream.remote(job)

    @grpc_errors(pb.RouteResponse)
    async def Route(self, request: pb.RouteRequest, grpc_context) -> pb.RouteResponse:
        arrived = time.perf_counter()
        decision, route_ms = await self._route(request.text, request.route)
        with self.outcome("Route", decision, request.route.true_task, arrived) as request_id:
            return pb.RouteResponse(decision=_decision_pb(decision), route_ms=route_ms, request_id=request_id)

    @grpc_errors(pb.FeedbackResponse)
    async def Feedback(self, request: pb.FeedbackRequest, grpc_context) -> pb.FeedbackResponse:
        """Labelled traffic after the fact: credits the accuracy of the version that answered `request_id`
        (in the canary counts only while the rollout is at the step it was answered in)."""
        if not request.true_task:
            raise BadRequestError("true_task is required (a task key 'domain/task')")
        try:
            version, top, counted_in = read_request_id(request.request_id)
        except LookupError as e:
            raise UnknownRequestError(str(e)) from None
        correct = top == request.true_task
        side = self.gate.side_of(version)
        if side is not None and counted_in is not None and counted_in == self._rollout_step():
            self.gate.label(side, correct)
        SERVE_METRICS.label(version, side or "none", correct)
        return pb.FeedbackResponse(correct=correct, catalog_version=version)

    @grpc_errors(pb.ListTasksResponse)
    async def ListTasks(self, request: pb.ListTasksRequest, grpc_context) -> pb.ListTasksResponse:
        info = await self.router.info.remote()
        tasks = [pb.Task(key=t["key"], domain=t["domain"], task=t["task"], metric=t["metric"],
                         has_adapter=t["adapter"] is not None, lora_variant=(t["lora"] or {}).get("variant", ""),
                         lora_rank=(t["lora"] or {}).get("r", 0)) for t in info["tasks"]]
        return pb.ListTasksResponse(tasks=tasks, catalog_version=info["version"], base_model=info["base_model"])

    @grpc_errors(pb.HealthResponse)
    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        info = await self.router.info.remote()
        return pb.HealthResponse(status="SERVING", catalog_version=info["version"], base_model=info["base_model"],
                                 routers=info["routers"])
