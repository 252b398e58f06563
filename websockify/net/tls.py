"""TLS for both legs of a session: contexts, sniffing, and a TLS stream.

The contexts are built once in the master, before workers fork (a bad
certificate stops the start with one line; SIGHUP builds new ones for the
new workers).  A connection's TLS runs in an ``ssl.SSLObject`` over memory
BIOs on a plain non-blocking socket, so the same object serves the
handshake greenlet (the cooperative calls wait on gevent's loop) and then
the relay (the non-blocking calls it drives from loop callbacks), without
gevent's SSL socket in between.
"""

import logging
import os
import socket
import ssl
import time
import _socket
from typing import Callable, Optional

from websockify.errors import ConfigError

log = logging.getLogger("websockify")

#: A TLS record header (handshake) or an SSLv2-style hello opens a TLS connection.
TLS_FIRST_BYTES = (0x16, 0x80)

#: Environment variable read for the key password when no option gives one.
KEY_PASSWORD_ENV = "WEBSOCKIFY_KEY_PASSWORD"

MIN_VERSIONS = {
    "tlsv1_1": ssl.TLSVersion.TLSv1_1,
    "tlsv1_2": ssl.TLSVersion.TLSv1_2,
    "tlsv1_3": ssl.TLSVersion.TLSv1_3,
}

# A TLS record carries at most 16 KiB of plaintext plus its overhead; reads
# leave this much room so that whatever is buffered decrypts in one call.
_RECORD_ROOM = 18 * 1024
_RAW_READ = 64 * 1024
_WRITE_CHUNK = 64 * 1024


class TLSConfigError(ConfigError):
    """A certificate, key or CA file that cannot be used."""


def looks_like_tls(first_byte: int) -> bool:
    return first_byte in TLS_FIRST_BYTES


# -- contexts ------------------------------------------------------------------

def _key_password(config) -> Optional[bytes]:
    """--key-password, else --key-password-file, else the environment variable."""
    if config.key_password:
        return config.key_password.encode()
    if config.key_password_file:
        try:
            with open(config.key_password_file, "rb") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise TLSConfigError("--key-password-file %s: %s"
                                 % (config.key_password_file, exc.strerror)) from None
        if not lines:
            raise TLSConfigError("--key-password-file %s is empty" % config.key_password_file)
        return lines[0]
    value = os.environ.get(KEY_PASSWORD_ENV)
    return value.encode() if value else None


def server_certificate(config) -> Optional[str]:
    """The certificate file to serve TLS with, or None (plain only).

    As in websockify, the default ``self.pem`` is used only if it exists;
    with --ssl-only a missing certificate is an error.
    """
    cert = config.cert              # made absolute by the command line parser
    if cert and os.path.exists(cert):
        return cert
    if config.ssl_only:
        raise TLSConfigError("--ssl-only: certificate file %s not found" % cert)
    return None


def build_server_context(config) -> Optional[ssl.SSLContext]:
    """The listener's TLS context, or None when no certificate is there."""
    cert = server_certificate(config)
    if cert is None:
        return None
    key = config.key or None
    password = _key_password(config)

    def ask_password() -> bytes:
        # Called only for an encrypted key: never let OpenSSL prompt on a tty.
        if password is None:
            raise TLSConfigError(
                "key %s is encrypted: give --key-password-file FILE or set %s"
                % (key or cert, KEY_PASSWORD_ENV))
        return password

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    minimum = MIN_VERSIONS.get(config.ssl_version or "default")
    if minimum is not None:
        context.minimum_version = minimum
    if config.ssl_ciphers:
        try:
            context.set_ciphers(config.ssl_ciphers)
        except ssl.SSLError:
            raise TLSConfigError("--ssl-ciphers %r: no cipher matches"
                                 % config.ssl_ciphers) from None
    try:
        context.load_cert_chain(cert, key, ask_password)
    except TLSConfigError:
        raise
    except ssl.SSLError as exc:
        what = "key %s" % key if key else "certificate %s" % cert
        raise TLSConfigError("cannot load %s: %s" % (what, _ssl_reason(exc))) from None
    except OSError as exc:
        raise TLSConfigError("cannot read %s: %s"
                             % (exc.filename or key or cert, exc.strerror)) from None
    if config.verify_client:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_cas(context, config.cafile, "--cafile", ssl.Purpose.CLIENT_AUTH)
    return context


def _load_cas(context: ssl.SSLContext, cafile: Optional[str], option: str,
              purpose: ssl.Purpose) -> None:
    if not cafile:
        context.load_default_certs(purpose)
        return
    try:
        context.load_verify_locations(cafile=cafile)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError("%s %s: %s" % (option, cafile, _ssl_reason(exc))) from None


class TargetContexts:
    """Client-side contexts for --ssl-target (one checks host names)."""

    def __init__(self, config):
        self.verify = not config.ssl_target_no_verify
        self.by_hostname = self._build(config, check_hostname=self.verify)
        # A unix-socket target has no name to check; the chain still is.
        self.without_hostname = self._build(config, check_hostname=False)

    def _build(self, config, check_hostname: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = check_hostname
        if self.verify:
            _load_cas(context, config.ssl_target_cafile, "--ssl-target-cafile",
                      ssl.Purpose.SERVER_AUTH)
        else:
            context.verify_mode = ssl.CERT_NONE
        return context

    def context_for(self, host: Optional[str]) -> ssl.SSLContext:
        return self.by_hostname if host else self.without_hostname


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
    if reason:
        return reason.replace("_", " ").lower() if reason.isupper() else reason
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """One short line for a failed TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate verify failed: %s" % _ssl_reason(exc)
    return _ssl_reason(exc)


# -- a TLS connection ----------------------------------------------------------

class TLSStream:
    """One TLS connection over a plain non-blocking socket.

    Non-blocking calls for the relay: ``recv_into`` (BlockingIOError when no
    plaintext is ready, 0 at the end), ``send`` and ``flush``.  Cooperative
    calls for the handshake greenlet: ``handshake``, ``recv``, ``sendall``,
    ``shutdown``.
    """

    __slots__ = ("sock", "incoming", "outgoing", "tls", "raw_out", "eof", "eof_told",
                 "unread")
    #: Tells the relay that bytes must pass through this object (no splice).
    encrypted = True

    def __init__(self, sock: _socket.socket, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: Optional[str] = None):
        sock.setblocking(False)
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.raw_out = bytearray()
        self.eof = False
        self.eof_told = False
        #: Until the first non-blocking read, the cooperative calls may have
        #: left complete records in ``incoming``.
        self.unread = True

    def fileno(self) -> int:
        return self.sock.fileno()

    def version(self) -> Optional[str]:
        return self.tls.version()

    def peer_common_name(self) -> Optional[str]:
        """The commonName of the peer's verified certificate, if it sent one."""
        try:
            cert = self.tls.getpeercert()
        except (ValueError, ssl.SSLError):
            return None
        # The last commonName wins, as in websockify 0.13.
        common_name = None
        for rdn in (cert or {}).get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    common_name = value
        return common_name

    # -- non-blocking ----------------------------------------------------

    def flush(self) -> bool:
        """Send the encrypted bytes waiting; True when none are left."""
        if self.outgoing.pending:
            self.raw_out += self.outgoing.read()
        raw = self.raw_out
        while raw:
            try:
                sent = self.sock.send(raw)
            except (BlockingIOError, InterruptedError):
                return False
            del raw[:sent]
        return True

    def _fill(self, limit: int) -> None:
        """Move up to ``limit`` socket bytes into the TLS input (BlockingIOError if none)."""
        data = self.sock.recv(limit)
        if data:
            self.incoming.write(data)
        else:
            self.eof = True
            self.incoming.write_eof()

    def recv_into(self, buf, nbytes: int = 0) -> int:
        """Decrypt what has arrived into ``buf``: the count, 0 at the end.

        Socket reads are sized so that everything they bring fits into
        ``buf`` once decrypted: no plaintext is left behind where a
        readiness watcher on the socket would not see it.
        """
        self.unread = False
        view = memoryview(buf)
        size = nbytes or len(view)
        got = 0
        try:
            while got < size:
                try:
                    count = self.tls.read(size - got, view[got:])
                except ssl.SSLWantReadError:
                    count = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    # close_notify, or the socket's end without one: what was
                    # decrypted before still counts, the end is told next.
                    self.eof = True
                    break
                if count:
                    got += count
                    continue
                if count == 0:          # close_notify read
                    self.eof = True
                    break
                room = size - got - _RECORD_ROOM
                if self.eof or room <= 0:
                    break
                try:
                    self._fill(min(room, _RAW_READ))
                except (BlockingIOError, InterruptedError):
                    break
        finally:
            if self.outgoing.pending:
                self.flush()        # e.g. a key update answer; the relay flushes the rest
        if got:
            return got
        if self.eof:
            self.eof_told = True
            return 0
        raise BlockingIOError("no TLS data ready")

    def buffered(self) -> bool:
        """Whether a read can make progress although the socket may not be readable.

        Bytes the handshake read past its end, plaintext left in the TLS
        object, or an end seen but not yet returned: a watcher on the socket
        would not report them.
        """
        return (self.unread or self.tls.pending() > 0
                or (self.eof and not self.eof_told))

    def send(self, data) -> int:
        """Encrypt and send part of ``data``: the count taken (BlockingIOError if none)."""
        if self.raw_out and not self.flush():
            raise BlockingIOError("TLS output pending")
        chunk = memoryview(data)[:_WRITE_CHUNK]
        taken = self.tls.write(chunk)
        self.flush()
        return taken

    def close(self) -> None:
        """Say close_notify if the socket takes it at once, then close."""
        try:
            self.tls.unwrap()
        except (ssl.SSLError, ValueError, OSError):
            pass
        try:
            self.flush()
        except OSError:
            pass
        self.sock.close()

    # -- cooperative (handshake greenlet) --------------------------------

    def _wait_readable(self, deadline: Optional[float]) -> None:
        from gevent.socket import wait_read
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        wait_read(self.sock.fileno(), timeout=timeout,
                  timeout_exc=socket.timeout("TLS peer sent nothing in time"))

    def _wait_writable(self, deadline: Optional[float]) -> None:
        from gevent.socket import wait_write
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        wait_write(self.sock.fileno(), timeout=timeout,
                   timeout_exc=socket.timeout("TLS peer took nothing in time"))

    def _flush_all(self, deadline: Optional[float] = None) -> None:
        while not self.flush():
            self._wait_writable(deadline)

    def _fill_waiting(self, deadline: Optional[float]) -> None:
        while True:
            try:
                self._fill(_RAW_READ)
                return
            except (BlockingIOError, InterruptedError):
                self._wait_readable(deadline)

    def _cooperate(self, operation: Callable, deadline: Optional[float] = None):
        """Run a TLS operation, feeding it socket bytes until it completes."""
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                self._flush_all(deadline)
                if self.eof:
                    raise ssl.SSLEOFError("peer closed the connection during TLS")
                self._fill_waiting(deadline)
                continue
            except ssl.SSLWantWriteError:
                self._flush_all(deadline)
                continue
            self._flush_all(deadline)
            return result

    def handshake(self, deadline: Optional[float]) -> None:
        """The TLS handshake, by ``deadline`` (time.monotonic); raises on failure."""
        try:
            self._cooperate(self.tls.do_handshake, deadline)
        except ssl.SSLError:
            # Send our alert, so the peer learns why.
            try:
                self.flush()
            except OSError:
                pass
            raise

    def recv(self, size: int) -> bytes:
        self.unread = True
        try:
            return self._cooperate(lambda: self.tls.read(size))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    def sendall(self, data) -> None:
        view = memoryview(data)
        while view:
            taken = self._cooperate(lambda: self.tls.write(view[:_WRITE_CHUNK]))
            view = view[taken:]

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            try:
                self.tls.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            try:
                self._flush_all(time.monotonic() + 1.0)
            except OSError:
                pass
        self.sock.shutdown(how)
