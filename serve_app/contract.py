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


@dataclass(frozen=True)
class GenerationJob:
    text: str
    decision: RouteDecision
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    base_only: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)   # how a replica knows a request
