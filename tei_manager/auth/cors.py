"""CORS: which browser origins may call the REST API, and the answers that say so.

Nothing is allowed by default. A preflight (``OPTIONS`` with
``Access-Control-Request-Method``) from an allowed origin gets the allowed
methods and headers; from any other origin it gets no CORS headers, which the
browser takes as a refusal. Pure: headers in, headers out.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CorsPolicy"]


class CorsPolicy:
    """The ``[cors]`` section as answers."""

    def __init__(
        self,
        allowed_origins: Sequence[str] = (),
        *,
        allow_credentials: bool = False,
        allowed_methods: Sequence[str] = ("GET", "POST", "DELETE"),
        allowed_headers: Sequence[str] = ("authorization", "content-type"),
        max_age_secs: int = 600,
    ) -> None:
        self._any = "*" in allowed_origins
        self._origins = frozenset(o.lower() for o in allowed_origins if o != "*")
        self._credentials = allow_credentials
        self._methods = frozenset(m.upper() for m in allowed_methods)
        self._methods_text = ", ".join(sorted(self._methods))
        self._headers = frozenset(h.lower() for h in allowed_headers)
        self._headers_text = ", ".join(sorted(self._headers))
        self._max_age = str(max_age_secs)

    @property
    def enabled(self) -> bool:
        return self._any or bool(self._origins)

    def _allows(self, origin: str) -> bool:
        return self._any or origin.lower() in self._origins

    def _origin_headers(self, origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": "*" if self._any else origin, "Vary": "Origin"}
        if self._credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an ordinary response to a request from ``origin``."""
        if origin is None or not self._allows(origin):
            return {}
        return self._origin_headers(origin)

    def preflight(
        self, origin: str | None, method: str | None, request_headers: str | None
    ) -> dict[str, str] | None:
        """Headers answering a preflight, or None when it is refused."""
        if origin is None or method is None or not self._allows(origin):
            return None
        if method.upper() not in self._methods:
            return None
        asked = [h.strip().lower() for h in (request_headers or "").split(",") if h.strip()]
        if any(h not in self._headers for h in asked):
            return None
        headers = self._origin_headers(origin)
        headers["Access-Control-Allow-Methods"] = self._methods_text
        if self._headers_text:
            headers["Access-Control-Allow-Headers"] = self._headers_text
        headers["Access-Control-Max-Age"] = self._max_age
        return headers
