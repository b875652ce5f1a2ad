"""The gengui exception tree, each class mapped once to an HTTP status and a code.

    GenguiError
     ├── InvalidInput            400  (validation_error, invalid_json, ...)
     ├── Unauthorized            401  unauthorized
     ├── Forbidden               403  (email_unverified, csrf_failed, ...)
     ├── NotFound                404  not_found
     ├── Conflict                409  (idempotency_key_reused, invalid_state, ...)
     ├── TooManyRequests         429  (rate_limited, too_many_active, daily_quota, ...)
                                      with a Retry-After header
     └── ProviderError                provider_error
          ├── ProviderRetryable       retried with backoff
          └── ProviderRejected        permanent: the generation fails

A class docstring is its default message.
"""

from __future__ import annotations

import math
from typing import Any


class GenguiError(Exception):
    """Something went wrong."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self, message: str | None = None, *, code: str | None = None, details: Any = None
    ) -> None:
        self.message = message or (self.__doc__ or "").strip()
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(self.message)

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class InvalidInput(GenguiError):
    """The request is not valid."""

    status = 400
    code = "validation_error"


class Unauthorized(GenguiError):
    """A valid bearer token is required."""

    status = 401
    code = "unauthorized"


class Forbidden(GenguiError):
    """You may not do this."""

    status = 403
    code = "forbidden"


class NotFound(GenguiError):
    """No such resource."""

    status = 404
    code = "not_found"


class Conflict(GenguiError):
    """The request conflicts with the resource's current state."""

    status = 409
    code = "conflict"


class TooManyRequests(GenguiError):
    """Too many requests: try again later."""

    status = 429
    code = "rate_limited"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float,
        code: str | None = None,
        details: Any = None,
    ) -> None:
        # Whole seconds, at least one: the Retry-After header takes no fractions.
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(
            message,
            code=code,
            details={"retry_after_s": self.retry_after_s, **(details or {})},
        )


class ProviderError(GenguiError):
    """The image provider failed."""

    status = 502
    code = "provider_error"


class ProviderRetryable(ProviderError):
    """The provider failed in a way worth retrying."""

    code = "provider_unavailable"


class ProviderRejected(ProviderError):
    """The provider refused the job; retrying will not help."""

    code = "provider_rejected"
