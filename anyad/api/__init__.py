"""HTTP handlers, one module per group of endpoints."""

from __future__ import annotations

from aiohttp import web

from anyad import openapi
from anyad.api import admin, chat, completions, dashboard, embeddings, history, messages, responses, system
from anyad.errors import ErrorBody, openai_error_body
from anyad.messages_api import anthropic_error_body


def register_v1_routes(app: web.Application) -> None:
    """The ``/v1`` doors (OpenAI's chat, completions, Responses, embeddings and models, and
    Anthropic's Messages): on the main listener, and on the Ollama listener too, where many
    tools are pointed at ``:11434/v1``."""
    app.router.add_post("/v1/chat/completions", chat.chat_completions)
    app.router.add_post("/v1/completions", completions.completions)
    app.router.add_post("/v1/messages", messages.messages)
    app.router.add_post("/v1/messages/count_tokens", messages.count_tokens)
    app.router.add_post("/v1/responses", responses.create)
    app.router.add_get("/v1/responses/{id}", responses.get)
    app.router.add_get("/v1/responses/{id}/input_items", responses.input_items)
    app.router.add_delete("/v1/responses/{id}", responses.delete)
    app.router.add_post("/v1/embeddings", embeddings.embeddings)
    app.router.add_get("/v1/models", system.list_models)
    app.router.add_get("/v1/models/{id:.+}", system.get_model)


def v1_error_bodies() -> tuple[tuple[str, ErrorBody], ...]:
    """The ``/v1`` doors' error shapes by path: OpenAI's, Anthropic's for Messages."""
    return (("/v1/", openai_error_body), ("/v1/messages", anthropic_error_body))


def register_routes(app: web.Application) -> None:
    register_v1_routes(app)
    app.router.add_post("/api/chat", chat.chat_completions)
    app.router.add_get("/openapi.json", openapi.openapi_json)
    app.router.add_get("/health", system.health)
    app.router.add_get("/ready", system.ready)
    app.router.add_get("/api/status", system.status)
    app.router.add_get("/api/timeline", system.timeline)
    app.router.add_get("/metrics", system.metrics)
    app.router.add_get("/api/usage", admin.usage)
    app.router.add_post("/api/models/{id}/load", admin.load_model)
    app.router.add_post("/api/models/{id}/unload", admin.unload_model)
    app.router.add_post("/api/reload", admin.reload)
    app.router.add_get("/", dashboard.index)
    app.router.add_get("/ui/{name}", dashboard.asset)
    app.router.add_get("/api/conversations", history.list_conversations)
    app.router.add_get("/api/conversations/{id}", history.get_conversation)
    app.router.add_delete("/api/conversations/{id}", history.delete_conversation)
