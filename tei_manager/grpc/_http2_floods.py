"""Flood and glitch accounting for one HTTP/2 connection (``_http2``), pure.

A peer can make us work without asking for anything: answer its PINGs and SETTINGS,
reset streams before we answer (Rapid Reset, CVE-2023-44487), send empty frames
(CVE-2019-9518), PRIORITY and unknown frames or WINDOW_UPDATEs our DATA never called
for. ``FloodGuard`` keeps a running counter for each, compared with its limit
(``Limits``) on the frame that moves it; a check returns True when the peer crossed
the line, and the connection ends with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tei_manager.grpc.limits import Limits


class FloodGuard:
    """What one peer made us do for nothing, against ``Limits``."""

    __slots__ = (
        "_clock",
        "_glitch_time",
        "_glitch_tokens",
        "_last_ping",
        "_limits",
        "control_queued",
        "empty_frames",
        "glitches",
        "ping_strikes",
        "premature_resets",
        "settings_frames",
        "streams_opened",
        "window_updates_earned",
    )

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        #: Streams the peer opened, and those it reset before our answer (or we refused).
        self.streams_opened = 0
        self.premature_resets = 0
        self.empty_frames = 0
        self.settings_frames = 0
        #: Control frames queued in answer to the peer and not yet taken for sending.
        self.control_queued = 0
        #: PINGs closer together than the minimum interval since we last sent headers.
        self.ping_strikes = 0
        self._last_ping = -math.inf
        #: Glitches (see ``Limits.glitch_burst``): all so far, and the token bucket.
        self.glitches = 0
        self._glitch_tokens = float(limits.glitch_burst)
        self._glitch_time = -math.inf
        #: WINDOW_UPDATEs the peer has earned with our DATA frames and its streams.
        self.window_updates_earned = 0

    def control_frame(self) -> bool:
        """We queue a frame in answer to the peer's; too many unsent is a flood."""
        self.control_queued += 1
        return self.control_queued > self._limits.max_queued_control_frames

    def empty_frame(self) -> bool:
        """A frame that does nothing for the peer (CVE-2019-9518)."""
        self.empty_frames += 1
        return self.empty_frames > self._limits.max_empty_frames

    def settings_frame(self) -> bool:
        """A SETTINGS frame (not an ACK) from the peer."""
        self.settings_frames += 1
        return self.settings_frames > self._limits.max_settings_frames

    def ping(self) -> bool:
        """A PING from a client: grpc-go's and grpc-core's keepalive enforcement.
        PINGs closer together than the minimum interval are strikes, until we next
        send headers (``ping_strikes = 0``)."""
        now = self._clock()
        limits = self._limits
        if now - self._last_ping < limits.min_ping_interval_secs:
            self.ping_strikes += 1
            if self.ping_strikes > limits.max_ping_strikes:
                return True
        self._last_ping = now
        return False

    def glitch(self) -> bool:
        """The peer made us work for nothing: take a token from the bucket; none left
        is a flood."""
        self.glitches += 1
        limits = self._limits
        now = self._clock()
        tokens = self._glitch_tokens + (now - self._glitch_time) * limits.glitch_rate_per_sec
        self._glitch_time = now
        tokens = min(tokens, limits.glitch_burst) - 1
        if tokens < 0:
            return True
        self._glitch_tokens = tokens
        return False

    def window_update(self) -> bool:
        """A WINDOW_UPDATE from the peer: one it earned, or a glitch."""
        if self.window_updates_earned > 0:
            self.window_updates_earned -= 1
            return False
        return self.glitch()

    def premature_reset(self) -> bool:
        """A stream the peer reset before we answered, or one we refused."""
        self.premature_resets += 1
        limits = self._limits
        return (
            self.streams_opened >= limits.rapid_reset_min_streams
            and self.premature_resets > limits.rapid_reset_max_ratio * self.streams_opened
        )
