"""OpenAI-compatible HTTP on the Serve HTTP port: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

`model="auto"` routes (the extra fields `top_k` and `routing_temperature` choose the fusion);
`model="<domain>/<task>"` fixes the adapter. `stream: true` answers with server-sent events in OpenAI's
chunk format, ending with `data: [DONE]`. The route decision and the catalog version come back in the
`switchboard` field of every answer and in the `x-switchboard-route` / `x-switchboard-catalog-version`
headers. Errors are OpenAI error objects with the HTTP status of the gRPC code the same error gets;
never a traceback. Sampling is greedy unless `temperature` > 0.

The routes are methods of `OpenAIRoutes`, mixed into the Ingress deployment (`@serve.ingress`), so
HTTP and gRPC share one validation and one path to the Router and the Generator.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from protos.switchboard.v1 import switchboard_pb2 as pb
from routing.decision import MAX_TOP_K, RouteDecision

from .config import MAX_NEW_TOKENS_LIMIT, MAX_SAMPLING_TEMPERATURE
from .contract import Answer, Delta, GenerationJob

AUTO_MODEL = "auto"

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
               grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
               grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
               grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
               grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
               grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error")}

http = FastAPI(title="Switchboard", description="OpenAI-compatible completions over routed LoRA adapters",
               docs_url=None, redoc_url=None)


class _Common(BaseModel):
    """Fields both completion routes take. Unknown fields are ignored (OpenAI clients send many);
    known ones we cannot honour (n > 1, logprobs, echo) are refused by name."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=MAX_SAMPLING_TEMPERATURE, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    logprobs: None | Literal[False] = None
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="Adapters fused (model=auto).")
    routing_temperature: float | None = Field(None, gt=0, allow_inf_nan=False,
                                              description="Routing softmax τ (model=auto).")


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@http.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()


class OpenAIRoutes:
    """The HTTP routes; the Ingress provides `cfg`, `router`, `_route`, `stream`, `admit` and `outcome`."""

    @http.get("/v1/models")
    async def models(self) -> JSONResponse:
        info = await self.router.info.remote()
        entries = [AUTO_MODEL] + [t["key"] for t in info["tasks"] if t["adapter"] is not None]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "switchboard", "parent": info["base_model"],
                 "root": info["base_model"]} for m in entries]
        return JSONResponse({"object": "list", "data": data},
                            headers={"x-switchboard-catalog-version": info["version"]})

    @http.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, CompletionRequest, chat=False)

    @http.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, ChatRequest, chat=True)

    async def _serve(self, request: Request, schema: type[_Common], chat: bool):
        from .ingress import status_of

        body, arrived = None, time.perf_counter()
        try:
            with self.admit(request):   # refused while the server drains (503: retry elsewhere)
                body = await _parse(request, schema)
                job, decision = await self._http_job(body, chat)
                answer = self._counted("chat.completions" if chat else "completions", decision, arrived,
                                       self.stream(job))
                first = await anext(answer)   # errors before the first token still get their HTTP status
        except OpenAIError as e:
            return e.response()
        except Exception as e:  # noqa: BLE001 - every error becomes an OpenAI error object
            return _error_of(status_of(e), body.model if body else None).response()
        headers = _route_headers(decision)
        reply = _Reply(chat, body.model, decision)
        if body.stream:
            return StreamingResponse(reply.events(first, answer), media_type="text/event-stream", headers=headers)
        try:
            text, out = ("", first) if isinstance(first, Answer) else (first.text, None)
            async for item in answer:
                if isinstance(item, Delta):
                    text += item.text
                else:
                    out = item
        except Exception as e:  # noqa: BLE001
            return _error_of(status_of(e), body.model).response()
        return JSONResponse(reply.whole(out), headers=headers)

    async def _counted(self, method: str, decision: RouteDecision, arrived: float,
                       items: AsyncIterator[Delta | Answer]) -> AsyncIterator[Delta | Answer]:
        """The Generator's stream, its outcome counted for the version that answered (as gRPC's are, so a
        canary judges HTTP traffic too) when it ends: answered, failed, or left by its client."""
        with self.outcome(method, decision, "", arrived):
            async for item in items:
                yield item

    async def _http_job(self, body: _Common, chat: bool) -> tuple[GenerationJob, RouteDecision]:
        if chat:
            users = [m.content for m in body.messages if m.role == "user"]
            if not users:
                raise OpenAIError(400, "messages: at least one message must have role 'user'", param="messages")
            text, messages = users[-1], tuple((m.role, m.content) for m in body.messages)
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise OpenAIError(400, "prompt: exactly one prompt per request", param="prompt")
            text, messages = prompts[0], None
        if body.model == AUTO_MODEL:
            options = pb.RouteOptions(top_k=body.top_k or 0, temperature=body.routing_temperature or 0.0)
        else:
            if body.top_k not in (None, 1):
                raise OpenAIError(400, f"top_k fuses routed adapters; model {body.model!r} names one (use model "
                                       f"'{AUTO_MODEL}')", param="top_k")
            options = pb.RouteOptions(router="fixed", task=body.model)
        decision, _ = await self._route(text, options)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(s for s in body.stop or () if s)
        job = GenerationJob(text, decision, body.max_completion_tokens or body.max_tokens or self.cfg.max_new_tokens,
                            stop, temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, seed=body.seed,
                            messages=messages)
        return job, decision


class _Reply:
    """OpenAI's answer shapes for one request."""

    def __init__(self, chat: bool, model: str, decision: RouteDecision):
        self.chat, self.model, self.decision = chat, model, decision
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
               "switchboard": {"decision": self.decision.to_dict(), "catalog_version": self.decision.catalog_version}}
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, out: Answer) -> dict:
        reason = _finish_reason(out.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": reason,
                      "logprobs": None}
            return self._envelope("chat.completion", choice, _usage(out))
        return self._envelope("text_completion", {"index": 0, "text": out.text, "finish_reason": reason,
                                                  "logprobs": None}, _usage(out))

    def chunk(self, text: str | None, out: Answer | None = None) -> dict:
        reason = _finish_reason(out.finish_reason) if out else None
        if self.chat:
            delta = {} if text is None else {"content": text}
            return self._envelope("chat.completion.chunk", {"index": 0, "delta": delta, "finish_reason": reason,
                                                            "logprobs": None}, _usage(out) if out else None)
        return self._envelope("text_completion", {"index": 0, "text": text or "", "finish_reason": reason,
                                                  "logprobs": None}, _usage(out) if out else None)

    async def events(self, first: Delta | Answer, rest: AsyncIterator[Delta | Answer]) -> AsyncIterator[str]:
        from .ingress import status_of

        if self.chat:
            yield _sse({**self.chunk(None), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "finish_reason": None, "logprobs": None}]})
        item = first
        try:
            while True:
                if isinstance(item, Answer):
                    yield _sse(self.chunk(None, item))
                    break
                yield _sse(self.chunk(item.text))
                item = await anext(rest)
        except Exception as e:  # noqa: BLE001 - the stream has started: the error is its last event
            yield _sse(_error_of(status_of(e), self.model).body())
        yield "data: [DONE]\n\n"


async def _parse(request: Request, schema: type[_Common]) -> _Common:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(400, f"{param}: {first['msg']}", param=param) from None


def _error_of(status: tuple[grpc.StatusCode, str], model: str | None) -> OpenAIError:
    code, message = status
    http_status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    if code == grpc.StatusCode.NOT_FOUND:
        return OpenAIError(404, f"model {model!r} does not exist: {message}", kind, "model", "model_not_found")
    return OpenAIError(http_status, message, kind)


def _route_headers(decision: RouteDecision) -> dict[str, str]:
    return {"x-switchboard-route": ",".join(f"{k}={w:.4f}" for k, w in decision.tasks),
            "x-switchboard-catalog-version": decision.catalog_version}


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(out: Answer) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.new_tokens,
            "total_tokens": out.prompt_tokens + out.new_tokens}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"

