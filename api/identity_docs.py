"""OpenAPI descriptions of the problem+json errors identity routes return.

Documented so clients (and the schemathesis run in the tests) know every status a route
can answer with and the body shape that comes with it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec

from api.problems import PROBLEM_MEDIA_TYPE


class FieldError(msgspec.Struct, frozen=True):
    field: str | None
    message: str | None
    source: str | None = None


class ProblemDetails(msgspec.Struct, frozen=True):
    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = None
    request_id: str | None = None


_DESCRIPTIONS = {
    400: "Malformed request (bad JSON, bad cursor, wrong or expired code)",
    401: "Missing, invalid or expired credentials",
    403: "Authenticated but not allowed",
    404: "Not found, or not yours",
    409: "Conflicts with existing state",
    413: "Request body too large",
    422: "Validation failed; see `errors`",
    429: "Rate limited; see Retry-After",
    503: "A dependency (e.g. the SMS/email provider) is unavailable",
}


def _spec(status: int) -> ResponseSpec:
    return ResponseSpec(data_container=ProblemDetails, generate_examples=False,
                        description=_DESCRIPTIONS[status], media_type=PROBLEM_MEDIA_TYPE)


ERRORS: dict[int, Any] = {status: _spec(status) for status in _DESCRIPTIONS}
PUBLIC_ERRORS = ERRORS
AUTH_ERRORS = ERRORS
