"""How much a peer may make one HTTP/2 connection hold: one frozen ``Limits`` value.

``GrpcServer`` and ``Channel`` take a ``Limits``; the sans-IO layers (``_http2``,
``_hpack``, ``_protocol``) and the trio layer (``transport``, ``server``) enforce it.
Every default comes from a mature stack, named beside it, or says why it is ours.
A peer that breaks a connection-wide limit gets GOAWAY (ENHANCE_YOUR_CALM for floods,
PROTOCOL_ERROR for protocol violations) and the connection is closed.
"""

from __future__ import annotations

import math

import msgspec

__all__ = ["DEFAULT_LIMITS", "Limits", "validate_limits"]

_KIB = 1024
_MIB = 1024 * 1024


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-connection (and per-listener) limits; the defaults suit a public port."""

    # -- streams --------------------------------------------------------------------
    #: SETTINGS_MAX_CONCURRENT_STREAMS we advertise. A stream the peer reset keeps
    #: counting until its handler has finished (CVE-2023-44487). h2 and Hypercorn
    #: advertise 100, nginx 128 (http2_max_concurrent_streams); the worker passes its
    #: --max-concurrent-requests.
    max_concurrent_streams: int = 100
    #: Rapid Reset (CVE-2023-44487): once the peer has opened this many streams, if
    #: more than ``rapid_reset_max_ratio`` of them were reset by the peer before we
    #: answered (or refused by us), GOAWAY ENHANCE_YOUR_CALM. Envoy's defaults
    #: (overload.premature_reset_total_stream_count = 500, ratio 50 %).
    rapid_reset_min_streams: int = 500
    rapid_reset_max_ratio: float = 0.5

    # -- header blocks ----------------------------------------------------------------
    #: SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 §6.5.2 size: name + value + 32 per
    #: field). A larger list resets only its stream. grpc-core's default metadata
    #: limit (GRPC_ARG_MAX_METADATA_SIZE) is 8 KiB.
    max_header_list_bytes: int = 8 * _KIB
    #: Encoded bytes of one header block (HEADERS + CONTINUATIONs), a running total
    #: checked as each frame arrives; more fails the connection (CVE-2024-27316/-27983
    #: "CONTINUATION flood"). h2's DEFAULT_MAX_HEADER_LIST_SIZE is 64 KiB.
    max_header_block_bytes: int = 64 * _KIB
    #: CONTINUATION frames in one header block; more fails the connection.
    #: h2's CONTINUATION_BACKLOG = 64.
    max_continuation_frames: int = 64
    #: Bytes the HPACK decoder may keep in its caches of decoded fields and blocks
    #: (ours: h2/hpack cache nothing). 64 KiB holds a busy peer's constant headers
    #: many times over; the peer's own table is at most 4 KiB (RFC 9113 §6.5.2).
    hpack_cache_bytes: int = 64 * _KIB
    #: Only fields and blocks of at most this many encoded bytes are cached: the
    #: headers worth caching (gRPC's constant ones) are small.
    hpack_cache_entry_max_bytes: int = 512

    # -- frames and flow control -------------------------------------------------------
    #: SETTINGS_MAX_FRAME_SIZE we advertise: the largest frame we buffer before
    #: parsing. Go's x/net/http2 server reads frames of up to 1 MiB
    #: (defaultMaxReadFrameSize).
    max_frame_bytes: int = _MIB
    #: Our initial stream window. Credited back as the application consumes the
    #: bytes; one stream per connection at a time may have a message larger than
    #: half of it credited as it is buffered (bounded by the message limit), so a
    #: 40 MiB message still streams at full speed. grpc-go's BDP estimator grows
    #: windows to at most 16 MiB; x/net/http2 gives 1 MiB (MaxUploadBufferPerStream).
    stream_receive_window_bytes: int = 4 * _MIB
    #: Our connection window, credited as the application consumes: with the one
    #: large message above, what a peer can park on a connection. grpc-go's BDP
    #: limit is 16 MiB; x/net/http2's MaxUploadBufferPerConnection is 1 MiB. 8 MiB
    #: keeps a parking peer under 16 MB of our memory per connection (benches/h2_abuse.py)
    #: and is still far above a loopback or LAN bandwidth-delay product.
    connection_receive_window_bytes: int = 8 * _MIB

    # -- floods --------------------------------------------------------------------------
    #: Output queued for a peer that does not read: above this the connection stops
    #: reading from it (and senders wait) until the socket drains.
    max_output_buffer_bytes: int = 4 * _MIB
    #: Control frames we queue in answer to the peer (PING ACK, SETTINGS ACK,
    #: RST_STREAM) that are not yet written: more is a flood (CVE-2019-9512/9515),
    #: GOAWAY ENHANCE_YOUR_CALM. Go's x/net/http2 maxQueuedControlFrames = 10000.
    max_queued_control_frames: int = 10_000
    #: Frames that carry nothing (DATA without payload or END_STREAM, header block
    #: fragments without bytes or END_HEADERS) over the connection's life: more is a
    #: flood (CVE-2019-9518). Node.js's maxSessionInvalidFrames = 1000.
    max_empty_frames: int = 1000
    #: SETTINGS frames (not ACKs) over the connection's life: legitimate peers send a
    #: handful (grpc-go's BDP estimator at most ~10); more is a flood (CVE-2019-9515).
    max_settings_frames: int = 100
    #: Entries in one SETTINGS frame: more is a flood (CVE-2020-11080).
    #: nghttp2's NGHTTP2_DEFAULT_MAX_SETTINGS = 32.
    max_settings_entries: int = 32

    #: "Glitches": frames that make us work for nothing — PRIORITY (we ignore it; RFC
    #: 9113 §5.3.2 deprecates its signals), WINDOW_UPDATEs beyond what our DATA earned
    #: (below), frames answered with a stream error (a zero window increment, a
    #: malformed request). A token bucket per connection: ``glitch_burst`` at once,
    #: ``glitch_rate_per_sec`` more each second; beyond it GOAWAY ENHANCE_YOUR_CALM
    #: (the CVE-2019-9513 "Resource Loop" and -9517 style floods: a million PRIORITY
    #: or 1-byte WINDOW_UPDATE frames). nghttp2's nghttp2_option_set_glitch_rate_limit
    #: defaults: 1000 and 33/s. Go's x/net/http2 only bounds the priority tree it keeps
    #: (MaxIdleNodesInTree 10), and like grpc-go the frames it queues in answer.
    glitch_burst: int = 1000
    glitch_rate_per_sec: float = 33.0
    #: WINDOW_UPDATEs each DATA frame we send earns the peer (each stream opened earns
    #: two); more are glitches. Envoy's max_inbound_window_update_frames_per_data_frame_sent
    #: = 10 (its note: 1 is enough for plain flow control, bandwidth estimators need 2).
    window_updates_per_data_frame: int = 10

    # -- time --------------------------------------------------------------------------
    #: From accept until the client preface and first SETTINGS (after TLS, which has
    #: the same bound): else the connection is closed. Our TLS handshake bound;
    #: nginx's client_header_timeout is 60 s, Hypercorn's h11 read timeout none.
    handshake_timeout_secs: float = 10.0
    #: A server connection with no open stream for this long gets GOAWAY and is
    #: closed. nginx's keepalive_timeout is 75 s; we allow more because our own
    #: connection pool keeps connections to workers open between bursts.
    idle_timeout_secs: float = 300.0
    #: Client side: send a PING after this long without receiving anything (None:
    #: never, grpc's default); no answer within ``keepalive_timeout_secs`` closes the
    #: connection. grpc's GRPC_ARG_KEEPALIVE_TIME_MS (off by default for clients).
    keepalive_interval_secs: float | None = None
    #: grpc's GRPC_ARG_KEEPALIVE_TIMEOUT_MS default: 20 s.
    keepalive_timeout_secs: float = 20.0
    #: Server side: PINGs closer together than this are strikes; more than
    #: ``max_ping_strikes`` of them get GOAWAY ENHANCE_YOUR_CALM ("too_many_pings").
    #: Strikes reset whenever we send headers. grpc-go's EnforcementPolicy.MinTime
    #: and grpc-core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: 5 min.
    min_ping_interval_secs: float = 300.0
    #: grpc-core's GRPC_ARG_HTTP2_MAX_PING_STRIKES and grpc-go's maxPingStrikes: 2.
    max_ping_strikes: int = 2

    # -- listener ------------------------------------------------------------------------
    #: Connections one listener serves at once; more are closed at once and counted.
    #: nginx's worker_connections default is 512.
    max_connections: int = 512


DEFAULT_LIMITS = Limits()

_AT_LEAST_ONE = (
    "max_concurrent_streams",
    "rapid_reset_min_streams",
    "max_continuation_frames",
    "hpack_cache_entry_max_bytes",
    "max_queued_control_frames",
    "max_empty_frames",
    "max_settings_frames",
    "max_settings_entries",
    "glitch_burst",
    "window_updates_per_data_frame",
    "max_connections",
)
_POSITIVE_SECS = (
    "handshake_timeout_secs",
    "idle_timeout_secs",
    "keepalive_timeout_secs",
    "min_ping_interval_secs",
    "glitch_rate_per_sec",
)


def validate_limits(limits: Limits) -> list[tuple[str, str]]:
    """Each broken rule as (field, rule); empty when ``limits`` is usable."""
    errors: list[tuple[str, str]] = []
    for name in _AT_LEAST_ONE:
        value = getattr(limits, name)
        if value < 1:
            errors.append((name, f"{value} is invalid: use a number >= 1"))
    for name in _POSITIVE_SECS:
        value = getattr(limits, name)
        if not math.isfinite(value) or value <= 0:
            errors.append((name, f"{value} is invalid: use a number > 0"))
    if limits.keepalive_interval_secs is not None and not (
        math.isfinite(limits.keepalive_interval_secs) and limits.keepalive_interval_secs > 0
    ):
        errors.append(
            ("keepalive_interval_secs", f"{limits.keepalive_interval_secs} is invalid: use > 0")
        )
    if not 0 < limits.rapid_reset_max_ratio <= 1:
        errors.append(
            ("rapid_reset_max_ratio", f"{limits.rapid_reset_max_ratio} is invalid: use 0 < r <= 1")
        )
    if limits.max_header_list_bytes < 1024:
        errors.append(
            ("max_header_list_bytes", f"{limits.max_header_list_bytes} is invalid: use >= 1024")
        )
    if limits.max_header_block_bytes < limits.max_header_list_bytes:
        errors.append(
            (
                "max_header_block_bytes",
                f"{limits.max_header_block_bytes} is below max_header_list_bytes",
            )
        )
    if not 16 * _KIB <= limits.max_frame_bytes <= 2**24 - 1:
        # RFC 9113 §6.5.2: SETTINGS_MAX_FRAME_SIZE is 2^14 to 2^24-1.
        rule = f"{limits.max_frame_bytes} is invalid: use 16384-16777215"
        errors.append(("max_frame_bytes", rule))
    for name in ("stream_receive_window_bytes", "connection_receive_window_bytes"):
        value = getattr(limits, name)
        # RFC 9113 §6.9: windows are 65535 to 2^31-1.
        if not 65535 <= value <= 2**31 - 1:
            errors.append((name, f"{value} is invalid: use 65535-2147483647"))
    if limits.hpack_cache_bytes < 0:
        errors.append(("hpack_cache_bytes", f"{limits.hpack_cache_bytes} is invalid: use >= 0"))
    if limits.max_output_buffer_bytes < 64 * _KIB:
        rule = f"{limits.max_output_buffer_bytes} is invalid: use >= 65536"
        errors.append(("max_output_buffer_bytes", rule))
    return errors
