"""The OpenAPI document of the public API, served at ``GET /openapi.json``.

Request bodies are the JSON schemas of the very pydantic models that validate them
(``anyad.schemas``), so the document cannot drift from what the daemon accepts; the
error body is the one ``anyad.errors.error_body`` writes.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

import anyad
from anyad.messages_api import CountTokensRequest, MessagesRequest
from anyad.responses_api import ResponsesRequest
from anyad.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest
from anyad.store import CONVERSATION_ID, MAX_QUERY_CHARS

REF = "#/components/schemas/{model}"


class _Reply(BaseModel):
    # Replies may grow fields; a client must not break on one it does not know.
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Reply):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Reply):
    """Every error of the OpenAI-compatible API, whatever its status."""

    error: ErrorDetail


class ChatCompletion(_Reply):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]


class TextCompletion(_Reply):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]


class EmbeddingsResponse(_Reply):
    object: Literal["list"]
    data: list[dict[str, Any]]
    model: str
    usage: dict[str, Any]


class Model(_Reply):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Reply):
    object: Literal["list"]
    data: list[Model]


class Health(_Reply):
    status: str
    version: str


class Readiness(_Reply):
    ready: bool
    models: dict[str, Any]


class ConversationPage(_Reply):
    object: Literal["list"]


class Conversation(_Reply):
    id: str


class AnthropicErrorDetail(_Reply):
    type: str
    message: str


class AnthropicError(_Reply):
    """Every error of the Messages door (Anthropic's shape), whatever its status."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class Message(_Reply):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: dict[str, Any]


class TokenCount(_Reply):
    input_tokens: int


class Response(_Reply):
    id: str
    object: Literal["response"]
    status: str
    output: list[dict[str, Any]]


class ResponseItemList(_Reply):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(_Reply):
    id: str
    object: Literal["response"]
    deleted: bool


_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest, CompletionRequest, EmbeddingsRequest, MessagesRequest, CountTokensRequest, ResponsesRequest,
    ChatCompletion, TextCompletion, EmbeddingsResponse, Message, TokenCount, Response, ResponseItemList,
    ResponseDeleted,
    ErrorResponse, AnthropicError, Model, ModelList, Health, Readiness, ConversationPage, Conversation]
# One server-sent event, as OpenAPI 3.2 describes a text/event-stream item: its data is a
# chunk's JSON, or [DONE].
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer", "minimum": 0}}}
# The statuses a request to a model can end with besides success (see anyad.errors).
MODEL_ERRORS = (400, 401, 403, 404, 413, 422, 429, 502, 503, 504)
READ_ERRORS = (401, 403, 404)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _responses(ok: dict[str, Any], errors: tuple[int, ...],
               error: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"200": ok}
    for status in errors:
        out[str(status)] = {"description": "an error", "content": _json(error)}
    return out


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": _json(model)}


def _chat(summary: str) -> dict[str, Any]:
    return {"summary": summary, "requestBody": _body(ChatCompletionRequest), "responses": _responses(
        {"description": "the completion; with stream: true, server-sent events ending in data: [DONE]",
         "content": {**_json(ChatCompletion), "text/event-stream": {"schema": SSE_EVENT}}},
        MODEL_ERRORS)}


def _get(summary: str, model: type[BaseModel], errors: tuple[int, ...] = READ_ERRORS,
         **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": _responses({"description": "OK", "content": _json(model)},
                                                                 errors), **extra}}


@cache
def document() -> dict[str, Any]:
    """The whole document (OpenAPI 3.1, whose schemas are the JSON Schema pydantic writes)."""
    _, top = models_json_schema([(m, "validation") for m in _MODELS], ref_template=REF)
    schemas = dict(top.get("$defs", {}))
    conversation_id = {"name": "id", "in": "path", "required": True,
                       "schema": {"type": "string", "pattern": CONVERSATION_ID.pattern}}
    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
            {"name": "q", "in": "query", "schema": {"type": "string", "maxLength": MAX_QUERY_CHARS}}]
    not_ready = {"description": "not ready: a preloaded model is not loaded yet", "content": _json(Readiness)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "anyad", "version": anyad.__version__,
                 "description": "A local-LLM gateway with an OpenAI-compatible API."},
        "components": {"schemas": schemas,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
        # Needed only where the daemon has keys; /health and /ready never need one.
        "security": [{}, {"apiKey": []}],
        "paths": {
            "/v1/chat/completions": {"post": _chat("Chat completions (OpenAI's contract)")},
            "/api/chat": {"post": _chat("Chat completions: the same contract as /v1/chat/completions")},
            "/v1/completions": {"post": {
                "summary": "Text completions (OpenAI's legacy contract): a raw prompt continued",
                "requestBody": _body(CompletionRequest), "responses": _responses(
                    {"description": "the completion; with stream: true, server-sent events ending in data: [DONE]",
                     "content": {**_json(TextCompletion), "text/event-stream": {"schema": SSE_EVENT}}},
                    MODEL_ERRORS)}},
            "/v1/messages": {"post": {
                "summary": "Anthropic's Messages API, for every model",
                "requestBody": _body(MessagesRequest), "responses": _responses(
                    {"description": "the message; with stream: true, Anthropic's server-sent events",
                     "content": {**_json(Message), "text/event-stream": {"schema": SSE_EVENT}}},
                    MODEL_ERRORS, AnthropicError)}},
            "/v1/messages/count_tokens": {"post": {
                "summary": "The input tokens a Messages request would cost",
                "requestBody": _body(CountTokensRequest), "responses": _responses(
                    {"description": "OK", "content": _json(TokenCount)}, MODEL_ERRORS, AnthropicError)}},
            "/v1/responses": {"post": {
                "summary": "OpenAI's Responses API, for every model (store: true keeps it)",
                "requestBody": _body(ResponsesRequest), "responses": _responses(
                    {"description": "the response; with stream: true, the Responses API's server-sent events",
                     "content": {**_json(Response), "text/event-stream": {"schema": SSE_EVENT}}},
                    MODEL_ERRORS)}},
            "/v1/responses/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                **_get("A stored response (404 if it is not this key's)", Response),
                "delete": {"summary": "Delete a stored response", "responses": _responses(
                    {"description": "deleted", "content": _json(ResponseDeleted)}, READ_ERRORS)}},
            "/v1/responses/{id}/input_items": {
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                **_get("The items a stored response was made from, a page at a time (404 if it is not this key's)",
                       ResponseItemList, (400, *READ_ERRORS), parameters=[
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                       "maximum": 100}},
                           {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                           {"name": "after", "in": "query", "schema": {"type": "string"}}])},
            "/v1/embeddings": {"post": {"summary": "Embeddings", "requestBody": _body(EmbeddingsRequest),
                                        "responses": _responses({"description": "OK",
                                                                 "content": _json(EmbeddingsResponse)},
                                                                MODEL_ERRORS)}},
            "/v1/models": _get("The models this daemon serves (those the key may use)", ModelList),
            "/v1/models/{id}": {"parameters": [{"name": "id", "in": "path", "required": True,
                                                "schema": {"type": "string"}}],
                                **_get("One model of the list (404 if this key may not use it)", Model)},
            "/health": _get("Liveness", Health, (), security=[{}]),
            "/ready": {"get": {"summary": "Readiness", "security": [{}], "responses": {
                "200": {"description": "ready", "content": _json(Readiness)}, "503": not_ready}}},
            "/api/conversations": _get("The chat history, newest first (q: full-text search)", ConversationPage,
                                       (400, 401, 403, 404), parameters=page),
            "/api/conversations/{id}": {
                "parameters": [conversation_id],
                **_get("One conversation with its messages", Conversation),
                "delete": {"summary": "Delete a conversation", "responses": {
                    "204": {"description": "deleted"},
                    **{str(s): {"description": "an error", "content": _json(ErrorResponse)} for s in READ_ERRORS}}},
            },
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())
