"""One HTTP request's ASGI exchange, kept so that the connection carrying it stays usable.

Hypercorn decides what happens to an HTTP/1.1 connection inside the application's
last ``send``: it keeps the connection alive for the next request (and starts the
keep-alive timer), or closes it (``Connection: close``, HTTP/1.0, a body left
unread). Two things get in the way of that with Quart-Trio, and :class:`Exchange`
handles both:

- Quart-Trio cancels the request's task as soon as the ``http.disconnect`` that
  Hypercorn queues during that last ``send`` arrives, which cut off the close or the
  keep-alive timer half way: connections then stayed open forever, and one idle
  client held up shutdown until the drain deadline. The last ``send`` is shielded; it
  only writes to the socket (which Hypercorn already shields) and updates timers.
- A handler that answers without reading the body (an unknown route, a POST to
  ``/start``) leaves the body on the wire; Hypercorn then cannot parse the next
  request. Quart-Trio reads the body in the background, so the answer waits for it
  to arrive (bounded in bytes and time, like nginx's lingering close), and a body
  that does not arrive in time, or is too large to take, ends the connection with
  ``Connection: close``. What is left after the application returns is read off
  too, so Hypercorn's reader never blocks on a full queue.
"""

from __future__ import annotations

from typing import Final

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
)

__all__ = ["BODY_LINGER_SECS", "Exchange"]

# How long an answer waits for the rest of a request body it did not read, and how
# long the body is read off after the application returned (nginx: lingering_timeout 5s).
BODY_LINGER_SECS: Final = 5.0


def _content_length(scope: HTTPScope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class Exchange:
    """Wraps one HTTP request's ``receive`` and ``send``; see the module docstring."""

    def __init__(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        *,
        max_body_bytes: int,
    ) -> None:
        self._receive = receive
        self._send = send
        self._max_body_bytes = max_body_bytes
        self._expected = _content_length(scope)
        self._received = 0
        self._body_complete = False  # the last body part arrived
        self._ended = False  # the last body part arrived, or the client went away
        self._stop_waiting = trio.Event()  # ended, or more body than we take
        self.status = 0  # the answer's status, once it is sent

    @property
    def too_large(self) -> bool:
        """The body announced or received so far is over the limit."""
        return max(self._received, self._expected or 0) > self._max_body_bytes

    async def receive(self) -> ASGIReceiveEvent:
        """The application's ``receive``, noting how much of the body has arrived."""
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self._body_complete = self._ended = True
        elif message["type"] == "http.disconnect":
            self._ended = True
        if self._ended or self.too_large:
            self._stop_waiting.set()
        return message

    async def send(self, message: ASGISendEvent) -> None:
        """The application's ``send``: the answer waits for the body; the last part is shielded."""
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if not await self._body_taken():
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await self._send(message)
            return
        await self._send(message)

    async def _body_taken(self) -> bool:
        """Wait, bounded, for the request body; False if the connection cannot carry another."""
        if not self._ended and not self.too_large:
            with trio.move_on_after(BODY_LINGER_SECS):
                await self._stop_waiting.wait()
        return self._body_complete and not self.too_large

    async def read_off_body(self) -> None:
        """After the application returned: take what is left of the body, bounded in time."""
        if self._ended:
            return
        with trio.move_on_after(BODY_LINGER_SECS):
            while not self._ended:
                await self.receive()
