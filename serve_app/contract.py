"""What the deployments hand each other, and the errors that cross replicas to the Ingress.

Light on purpose (no torch, no model code): the Ingress and the client import it without loading
the model stack. The Ingress maps these errors to gRPC status codes; any other error is the
server's, not the client's, and becomes INTERNAL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from routing.decision import RouteDecision

APP_NAME = "switchboard"


class BadRequestError(ValueError):
    """The client's request cannot be served as sent (INVALID_ARGUMENT); the message says why."""


class UnknownRouterError(BadRequestError):
    """The request names a router the served catalog does not carry."""


class PromptTooLongError(BadRequestError):
    """The rendered prompt leaves no room in the base model's context for even one new token."""


class CatalogChangedError(RuntimeError):
    """The request was routed on a catalog version this replica has switched away from (retryable)."""


class NoAdapterError(RuntimeError):
    """The route names only tasks without an adapter (a routing-only catalog entry): answering with the
    bare base would hide that (FAILED_PRECONDITION; `base_only` asks for the bare base explicitly)."""


class OverloadedError(RuntimeError):
    """The Generator's queue is full: retry later (RESOURCE_EXHAUSTED, HTTP 429)."""


@dataclass(frozen=True)
class GenerationJob:
    """One request for the Generator. Sampling is greedy unless `temperature` > 0 (this is the sampling
    temperature, not the routing softmax's τ, which the decision already reflects)."""

    text: str
    decision: RouteDecision
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    base_only: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    messages: tuple[tuple[str, str], ...] | None = None   # a chat: (role, content); `text` is what was routed
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)   # how a replica knows a request


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed answer: whole characters, never part of a stop string."""

    text: str


@dataclass(frozen=True)
class Answer:
    """A finished answer; the last item of a stream, the whole reply of a unary call."""

    text: str
    new_tokens: int
    finish_reason: str        # "eos", "length" (budget or context), "stop"
    prompt_tokens: int
    ttft_ms: float            # from the Generator receiving the request to the first new token
    total_ms: float
