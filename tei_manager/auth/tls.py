"""Server TLS for both ports, and certificate hot reload.

Each port gets one long-lived :class:`ssl.SSLContext` (the REST port's offers ALPN
h2 and http/1.1, the multiplexer's only h2, which grpcio requires). TLS 1.2 is the
minimum. When client certificates are verified natively the context *asks* for one
(``CERT_OPTIONAL``): OpenSSL refuses a certificate that does not chain to
``ca_cert``, is out of its dates or is not for client auth, in the handshake, and a
request without one gets a proper 401 from the application instead of a bare
handshake failure (and can still use an API key).

Reload (SIGHUP, or a changed modification time of any of the files, checked every
``reload_check_secs``) loads the new files into a scratch context first, so a
half-written or mismatched pair changes nothing, then into the live contexts: a
context hands its certificate to each new connection, and connections already open
keep theirs, so nothing is dropped. OpenSSL's trust store only grows, so the
authoritative check of a client certificate is ours: the authenticator's verifier is
replaced by one built from the new CA bundle, and a CA removed from the file stops
being accepted at once.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
from collections.abc import Callable, Sequence
from typing import Final

import trio

from tei_manager.auth.build import certificate_policy, read_ca_bundle
from tei_manager.auth.certs import CertificateVerifier
from tei_manager.auth.policy import Authenticator
from tei_manager.auth.settings import AuthConfig, MtlsConfig
from tei_manager.errors import ConfigError

__all__ = ["GRPC_ALPN", "REST_ALPN", "ServerTls", "server_tls"]

log = logging.getLogger(__name__)

REST_ALPN: Final = ("h2", "http/1.1")
GRPC_ALPN: Final = ("h2",)


def _new_context(alpn: Sequence[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(list(alpn))
    return context


class ServerTls:
    """The TLS contexts of both ports and the files they come from."""

    def __init__(
        self,
        mtls: MtlsConfig,
        *,
        verify_clients: bool,
        authenticator: Authenticator | None = None,
    ) -> None:
        assert mtls.server_cert is not None and mtls.server_key is not None
        self._mtls = mtls
        self._verify_clients = verify_clients
        self._authenticator = authenticator
        self.rest_context = _new_context(REST_ALPN)
        self.grpc_context = _new_context(GRPC_ALPN)
        self.reloads = 0
        self._stamps = self._file_stamps()
        self._load(first=True)
        for context in self.contexts:
            if verify_clients:
                context.verify_mode = ssl.CERT_OPTIONAL
            else:
                context.verify_mode = ssl.CERT_NONE

    @property
    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        return self.rest_context, self.grpc_context

    @property
    def files(self) -> list[str]:
        mtls = self._mtls
        paths = [mtls.server_cert, mtls.server_key]
        if self._verify_clients:
            paths.append(mtls.ca_cert)
        return [p for p in paths if p is not None]

    def _file_stamps(self) -> list[tuple[int, int, int] | None]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return stamps

    def _load(self, *, first: bool = False) -> None:
        """Load the files into the live contexts; raises ConfigError, changing nothing."""
        mtls = self._mtls
        assert mtls.server_cert is not None and mtls.server_key is not None
        scratch = _new_context(GRPC_ALPN)
        try:
            scratch.load_cert_chain(mtls.server_cert, mtls.server_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"auth.mtls.server_cert: cannot load {mtls.server_cert} with its key "
                f"{mtls.server_key}: {getattr(e, 'strerror', None) or e}"
            ) from None
        verifier = None
        ca_pem = None
        if self._verify_clients and mtls.ca_cert is not None:
            bundle = read_ca_bundle(mtls.ca_cert)
            verifier = CertificateVerifier(bundle, certificate_policy(mtls))
            with open(mtls.ca_cert, encoding="ascii", errors="replace") as f:
                ca_pem = f.read()
            try:
                scratch.load_verify_locations(cadata=ca_pem)
            except ssl.SSLError as e:
                raise ConfigError(f"auth.mtls.ca_cert: cannot load {mtls.ca_cert}: {e}") from None
        # Checked: now the live contexts, which cannot fail on files just loaded.
        for context in self.contexts:
            context.load_cert_chain(mtls.server_cert, mtls.server_key)
            if ca_pem is not None:
                context.load_verify_locations(cadata=ca_pem)
        if verifier is not None and self._authenticator is not None and not first:
            self._authenticator.certificates = verifier

    def reload(self) -> bool:
        """Re-read the files now; False (logged, old ones kept) if they are unusable."""
        self._stamps = self._file_stamps()
        try:
            self._load()
        except (ConfigError, OSError) as e:
            log.error("TLS certificates not reloaded, keeping the current ones: %s", e)
            return False
        self.reloads += 1
        log.info("TLS certificates reloaded from %s", ", ".join(self.files))
        return True

    def changed(self) -> bool:
        """Whether any file's modification time, size or inode changed since the last load."""
        return self._file_stamps() != self._stamps

    async def run(
        self,
        *,
        on_reload: Callable[[bool], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Reload on SIGHUP, and when the files change (checked every reload_check_secs).

        ``on_reload`` is told the outcome of every attempt.
        """

        def attempt() -> None:
            ok = self.reload()
            if on_reload is not None:
                on_reload(ok)

        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    async for _ in signals:
                        log.info("SIGHUP received: reloading TLS certificates")
                        attempt()

                nursery.start_soon(on_signals)
                task_status.started()
                while True:
                    await trio.sleep(self._mtls.reload_check_secs)
                    # cert-manager and kubelet replace files by renaming a new
                    # directory into place: a stat sees the new inode.
                    if self.changed():
                        attempt()


def server_tls(auth: AuthConfig, authenticator: Authenticator | None = None) -> ServerTls | None:
    """The TLS contexts ``auth`` asks for (``[auth.mtls]`` server_cert/key), or None."""
    mtls = auth.mtls
    if mtls is None or mtls.server_cert is None:
        return None
    verify = (
        auth.enabled
        and "mtls" in auth.providers
        and not auth.require_cert_headers
        and mtls.ca_cert is not None
    )
    return ServerTls(mtls, verify_clients=verify, authenticator=authenticator)
