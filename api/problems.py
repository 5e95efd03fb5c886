"""RFC 9457 problem+json for every error the API returns.

Services raise `Problem` (or Litestar's HTTP exceptions); the handlers here turn each into
`application/problem+json` with a stable `type` URI, a title, a detail, and field-level
`errors` for validation failures. Unexpected exceptions become a 500 that says nothing
about internals and logs the traceback with the request id.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from ops.logging import request_id_var

log = logging.getLogger("fintide.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://fintide.dev/problems/"
# Default problem type per status, for errors raised without an explicit slug.
_SLUG_BY_STATUS = {
    400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
    405: "method-not-allowed", 409: "conflict", 413: "payload-too-large",
    415: "unsupported-media-type", 422: "validation-error", 429: "rate-limited",
    500: "internal-error", 503: "unavailable",
}
_TITLE_BY_STATUS = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 409: "Conflict", 413: "Payload too large",
    415: "Unsupported media type", 422: "Validation error", 429: "Too many requests",
    500: "Internal server error", 503: "Service unavailable",
}


class Problem(HTTPException):
    """An error with a stable problem type; raise it from any handler or service."""

    def __init__(self, status_code: int, slug: str | None = None, detail: str = "", *,
                 title: str | None = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail=detail or _TITLE_BY_STATUS.get(status_code, "Error"),
                         status_code=status_code, headers=headers)
        self.slug = slug or _SLUG_BY_STATUS.get(status_code, "error")
        self.title = title or _TITLE_BY_STATUS.get(status_code, "Error")
        self.errors = errors
        self.fields = extra


def problem_response(request: Request[Any, Any, Any], status: int, slug: str, title: str,
                     detail: str, *, errors: list[dict[str, Any]] | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status,
                            "detail": detail, "instance": request.url.path}
    if errors:
        body["errors"] = errors
    if request_id := request_id_var.get():
        body["request_id"] = request_id
    body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _validation_errors(exc: ValidationException) -> list[dict[str, Any]]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    return [{"field": e.get("key"), "message": e.get("message"), "source": e.get("source")}
            for e in extra if isinstance(e, dict)]


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if isinstance(exc, Problem):
        return problem_response(request, status, exc.slug, exc.title, exc.detail,
                                errors=exc.errors, headers=exc.headers, **exc.fields)
    errors = _validation_errors(exc) if isinstance(exc, ValidationException) else None
    if status == 400 and errors:
        # Litestar reports body/param validation failures as 400; they are 422s to clients.
        status = 422
    slug = _SLUG_BY_STATUS.get(status, "error")
    title = _TITLE_BY_STATUS.get(status, "Error")
    detail = exc.detail if status < 500 else title
    return problem_response(request, status, slug, title, detail, errors=errors, headers=exc.headers)


def handle_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(request, HTTP_500_INTERNAL_SERVER_ERROR, "internal-error",
                            "Internal server error", "An unexpected error occurred.")


EXCEPTION_HANDLERS = {HTTPException: handle_http_exception, Exception: handle_internal_error}
