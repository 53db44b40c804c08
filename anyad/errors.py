"""The one error hierarchy of anyad, and its one mapping to HTTP.

Everything that can go wrong for a client is an ``AnyadError`` carrying the
HTTP status and OpenAI's error fields; ``error_body`` is the only place that
turns one into the wire shape ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

from typing import Any, Callable


class AnyadError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # May another target of a route answer instead? True for failures of the target
    # (down, overloaded, crashed); False for the client's own mistakes.
    retryable: bool = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# How a door writes an error's body: OpenAI's shape here, Anthropic's beside its Messages
# door (``anyad.messages_api``), Ollama's in its plugin.
ErrorBody = Callable[[AnyadError], object]


def openai_error_body(exc: AnyadError) -> object:
    return exc.body()


class InvalidRequest(AnyadError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(AnyadError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(AnyadError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class NotFound(AnyadError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(AnyadError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(AnyadError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(AnyadError):
    """The client stopped sending its request body part way."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class QueueFull(AnyadError):
    """A model's queue is full; the client should come back after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retryable = True

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class RateLimited(QueueFull):
    """A client went past its request rate (``server.rate_limit_per_minute``)."""

    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    """A key went past its tokens per day or month, or its requests per minute."""

    code = "quota_exceeded"


class BackendError(AnyadError):
    """The engine or provider behind a model failed (a worker crashed, an upstream broke)."""

    status = 502
    type = "server_error"
    code = "backend_error"
    retryable = True


class NetworkError(BackendError):
    """The provider could not be reached at all (refused, DNS, connect timeout): counts towards offline."""

    code = "network_error"


class ConnectionRefused(NetworkError):
    """The provider's host refused the connection: the network is up, the service is not
    (its breaker's business, never a reason to count the machine offline)."""


class UpstreamError(AnyadError):
    """A provider answered with an error: its status and message reach the client as they came."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
        super().__init__(message, param=param, code=code, headers=headers)
        self.status = status
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after
        # 5xx and 429 are the provider's trouble; so is a rejected provider key (401/403),
        # which anyad holds, not the client. 400/404/422 are about the request itself.
        self.retryable = status >= 500 or status in (401, 403, 408, 429)


class Timeout(AnyadError):
    status = 504
    type = "server_error"
    code = "timeout"
    retryable = True


class Unavailable(AnyadError):
    status = 503
    type = "server_error"
    code = "unavailable"
    retryable = True

    def __init__(self, message: str, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    @property
    def retry_after(self) -> int | None:
        return self._retry_after

    @retry_after.setter
    def retry_after(self, value: int | None) -> None:
        # Kept in step with the header, since it may be set after construction.
        self._retry_after = value
        if value is None:
            self.headers.pop("Retry-After", None)
        else:
            self.headers["Retry-After"] = str(max(1, int(value)))


class PluginError(AnyadError):
    """A plugin guarding requests failed: the request is refused rather than let through."""

    status = 500
    type = "server_error"
    code = "plugin_error"


class ConfigError(Exception):
    """Invalid configuration: stops the daemon with one readable message."""


class LoadFailed(Unavailable):
    """A model's engine could not load it as placed (a bad file, out of memory on the device)."""

    code = "model_load_failed"
