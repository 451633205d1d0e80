"""HTTP GET for web ingest: one hard deadline per attempt, bounded bytes and redirects, opt-outs.

Why not ``urllib`` or ``requests``: their timeouts apply to each socket read, so a server that
drips one byte a second never times out, and a shard waits on it for minutes (img2dataset's
"hangs near the end"). Here every attempt has a deadline, ``timeout`` seconds after it starts;
a reaper thread shuts the socket down when the deadline passes, whatever the request is doing
(waiting for headers, reading a slow body), and the attempt fails as ``timeout``.

Failures are :class:`FetchError` with a short ``kind`` (``http_404``, ``timeout``,
``redirect_loop``, ``opt_out`` ...) that names the cause for metrics, and a message for people.
Transient kinds (timeouts, dropped connections, 429 and 5xx) are retried with exponential
backoff and jitter; the others fail at once. Idle keep-alive connections are reused per thread.
Messages never quote what a server sent beyond its status line (no body bytes, no garbled
status line): a URL list is untrusted, and error messages go to Parquet, MLflow and logs.

With ``refuse_private_addresses`` (on for ``ingest_urls``), every hop's host is resolved first
and refused (``private_address``) when any of its addresses is not globally routable: loopback,
private, link-local (cloud metadata at 169.254.169.254), carrier-grade NAT (100.64/10, where
some clouds put theirs), unique-local IPv6 (fd00:ec2::254), multicast, reserved, unspecified (an
IPv4-mapped IPv6 address is judged as its IPv4 address). The connection then goes to the address that was checked, not to a second lookup
(which a rebinding DNS server could answer differently). ``allow_networks`` exempts CIDRs. Behind
a proxy the target is resolved here too (best effort: the proxy resolves it again).
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import ipaddress
import itertools
import random
import socket
import ssl
import threading
import time
import urllib.request
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urljoin, urlsplit

from mmflow.data.net import describe_error, is_disallowed, not_public  # noqa: F401

DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
REDIRECTS = (301, 302, 303, 307, 308)
TRANSIENT = frozenset({"timeout", "connection", "protocol", "dns_again"})
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 1 << 16
IDLE_PER_THREAD = 4  # keep-alive connections a thread keeps; web lists rarely repeat a host more


class FetchError(Exception):
    def __init__(self, kind: str, message: str, attempts: int = 1):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.attempts = kind, message, attempts

    @property
    def transient(self) -> bool:
        if self.kind.startswith("http_") and self.kind[5:].isdigit():
            return int(self.kind[5:]) in TRANSIENT_HTTP
        return self.kind in TRANSIENT


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0  # seconds per attempt, from connecting to the last body byte
    retries: int = 2  # extra attempts after a transient failure
    retry_backoff: float = 1.0  # first pause before a retry; doubles each time (with jitter)
    user_agent: str = "Mozilla/5.0 (compatible; mmflow; +https://github.com/mmflow/mmflow)"
    user_agent_token: str | None = "mmflow"  # X-Robots-Tag lines scoped to this token apply too
    max_bytes: int = 32 << 20
    max_redirects: int = 5
    disallowed_directives: tuple[str, ...] = DISALLOWED_DIRECTIVES  # empty: ignore X-Robots-Tag
    verify_tls: bool = True
    refuse_private_addresses: bool = False  # see the module doc; on for web lists
    allow_networks: tuple[str, ...] = ()  # CIDRs exempt from the refusal


@dataclass
class FetchResult:
    data: bytes
    url: str  # after redirects
    content_type: str | None
    attempts: int


class _Watch:
    __slots__ = ("sock", "done", "fired")

    def __init__(self, sock: socket.socket):
        self.sock, self.done, self.fired = sock, False, False


class _Reaper:
    """Shuts down the sockets of attempts that passed their deadline (one thread per process).

    ``shutdown`` (not ``close``) from another thread is safe and wakes a blocked read at once."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> _Watch:
        w = _Watch(sock)
        with self._cv:
            heapq.heappush(self._heap, (deadline, next(self._seq), w))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-reaper", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is w:
                self._cv.notify()
        return w

    def unwatch(self, w: _Watch) -> bool:
        """Stop watching; True when the deadline had already fired (the socket is dead)."""
        with self._cv:
            w.done = True
            return w.fired

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                deadline, _, w = self._heap[0]
                if w.done:
                    heapq.heappop(self._heap)
                    continue
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                w.fired = True
                # the base-class method: SSLSocket.shutdown would also drop its TLS state
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(w.sock, socket.SHUT_RDWR)


_REAPER = _Reaper()


class Fetcher:
    """Thread-safe downloader; one per shard task. ``get(url)`` -> :class:`FetchResult`."""

    def __init__(self, opts: FetchOptions):
        self.opts = opts
        self._local = threading.local()
        self._all_idle: list[OrderedDict] = []  # every thread's, to close them all at the end
        self._lock = threading.Lock()
        self._proxies = urllib.request.getproxies()
        self._ssl = ssl.create_default_context()
        if not opts.verify_tls:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE

    def get(self, url: str) -> FetchResult:
        """Download with retries of transient failures; raises :class:`FetchError`."""
        for attempt in range(1, self.opts.retries + 2):
            try:
                result = self._attempt(url, time.monotonic() + self.opts.timeout)
                result.attempts = attempt
                return result
            except FetchError as e:
                e.attempts = attempt
                if not e.transient or attempt > self.opts.retries:
                    raise
            pause = self.opts.retry_backoff * 2 ** (attempt - 1)
            time.sleep(min(pause, 60.0) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            for idle in self._all_idle:
                for conn in list(idle.values()):  # a given-up thread may still use its own
                    conn.close()

    # ---- one attempt: follow redirects under one deadline ---------------------------------------
    def _attempt(self, url: str, deadline: float) -> FetchResult:
        seen = {url}
        for hop in range(self.opts.max_redirects + 1):
            status, reason, headers, body = self._request(url, deadline)
            if status in REDIRECTS and headers.get("Location"):
                url = urljoin(url, headers["Location"].strip())
                if url in seen:
                    raise FetchError("redirect_loop", f"back to a URL already seen, hop {hop + 1}")
                seen.add(url)
                continue
            if not 200 <= status < 300:  # no URL in the message: messages are counted alike
                raise FetchError(f"http_{status}", f"HTTP {status} {reason}".strip())
            return FetchResult(body or b"", url, headers.get("Content-Type"), 1)
        raise FetchError("too_many_redirects", f"more than {self.opts.max_redirects} redirects")

    def _request(self, url: str, deadline: float) -> tuple[int, str, Message, bytes | None]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("invalid_url", f"not an http(s) URL: {url[:200]!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise FetchError("invalid_url", str(e)) from None
        proxy = self._proxy_for(parts.scheme, parts.hostname)
        key = (parts.scheme, parts.hostname, port, proxy)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = url.split("#")[0] if proxy and parts.scheme == "http" else path
        conn = self._idle().pop(key, None)
        if conn is not None:  # a reused connection may have been closed by the server meanwhile
            try:
                return self._exchange(conn, key, target, deadline)
            except FetchError as e:
                if e.kind != "stale" or time.monotonic() >= deadline:
                    raise
        conn = self._connect(parts.scheme, parts.hostname, port, proxy, deadline)
        return self._exchange(conn, key, target, deadline)

    def _exchange(self, conn, key, target, deadline) -> tuple[int, str, Message, bytes | None]:
        """Send the request and read the answer on ``conn``; keeps the connection when it can."""
        fresh = conn.sock is None
        if fresh:
            self._open(conn, deadline)
        watch = _REAPER.watch(conn.sock, deadline)
        keep = False
        try:
            conn.request("GET", target, headers=self._headers())
            resp = conn.getresponse()
            status, reason, headers = resp.status, resp.reason, resp.headers
            body = None
            if 200 <= status < 300:
                if self.opts.disallowed_directives and is_disallowed(
                    headers, self.opts.disallowed_directives, self.opts.user_agent_token
                ):
                    raise FetchError("opt_out", f"X-Robots-Tag: {headers.get('X-Robots-Tag')}")
                body = self._read_body(resp, headers)
                if watch.fired:  # a body without a length just ends when the socket is shut
                    raise self._timeout()
                keep = not resp.will_close
            return status, reason, headers, body
        except FetchError:
            raise
        except http.client.InvalidURL as e:
            raise FetchError("invalid_url", describe_error(e)) from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
            if watch.fired:
                raise self._timeout() from None
            if not fresh:
                raise FetchError("stale", "reused connection was closed") from None
            raise FetchError("connection", describe_error(e)) from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            if watch.fired or isinstance(e, TimeoutError):
                raise self._timeout() from None
            bad_answer = isinstance(e, ValueError | http.client.HTTPException) and not isinstance(
                e, http.client.IncompleteRead
            )
            raise FetchError(
                "protocol" if bad_answer else "connection", describe_error(e)
            ) from None
        finally:
            if _REAPER.unwatch(watch) or not keep:
                conn.close()
            else:
                self._keep(key, conn)

    def _read_body(self, resp: http.client.HTTPResponse, headers: Message) -> bytes:
        limit = self.opts.max_bytes
        length = headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > limit:
            raise FetchError("too_large", f"Content-Length {int(length)} > max_bytes {limit}")
        chunks, total = [], 0
        while chunk := resp.read(CHUNK):
            total += len(chunk)
            if total > limit:
                raise FetchError("too_large", f"body over max_bytes {limit}")
            chunks.append(chunk)
        data = b"".join(chunks)
        encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            data = _inflate(data, encoding, limit)
        elif encoding != "identity":
            raise FetchError("bad_encoding", f"unsupported Content-Encoding {encoding!r}")
        return data

    # ---- connections ----------------------------------------------------------------------------
    def _connect(self, scheme, host, port, proxy, deadline) -> http.client.HTTPConnection:
        timeout = max(deadline - time.monotonic(), 0.01)
        checked = self._checked_address(host, port) if self.opts.refuse_private_addresses else None
        if proxy:
            p = urlsplit(proxy)
            if scheme == "https":  # CONNECT tunnel through the proxy
                conn = http.client.HTTPSConnection(
                    p.hostname, p.port or 80, timeout=timeout, context=self._ssl
                )
                conn.set_tunnel(host, port)
                return conn
            return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=timeout)
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if checked is not None:  # connect to the address checked; TLS and Host still name `host`
            conn._create_connection = lambda _addr, *a: socket.create_connection(checked, *a)
        return conn

    def _checked_address(self, host: str, port: int) -> tuple:
        """The (ip, port) to connect to, every address of ``host`` having been checked."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise self._connect_error(e) from None
        allowed = [ipaddress.ip_network(n, strict=False) for n in self.opts.allow_networks]
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            why = not_public(ip)
            if why and not any(ip in net for net in allowed):
                raise FetchError(
                    "private_address", f"the host resolves to a non-public address ({why})"
                )
        return infos[0][4][:2]

    def _open(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        """Connect (DNS, TCP, TLS) within what is left of the deadline."""
        conn.timeout = max(deadline - time.monotonic(), 0.01)
        try:
            conn.connect()
        except OSError as e:
            conn.close()  # a failed TLS handshake leaves the plain socket open
            raise self._connect_error(e) from None

    def _connect_error(self, e: OSError) -> FetchError:
        if isinstance(e, socket.gaierror):
            return FetchError(
                "dns_again" if e.errno == socket.EAI_AGAIN else "dns", describe_error(e)
            )
        if isinstance(e, ssl.SSLError | ssl.CertificateError):
            return FetchError("ssl", describe_error(e))
        if isinstance(e, TimeoutError):
            return self._timeout()
        return FetchError("connection", describe_error(e))

    def _idle(self) -> OrderedDict:
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = OrderedDict()
            with self._lock:
                self._all_idle.append(idle)
        return idle

    def _keep(self, key, conn) -> None:
        idle = self._idle()
        old = idle.pop(key, None)
        if old is not None:
            old.close()
        idle[key] = conn
        while len(idle) > IDLE_PER_THREAD:
            idle.popitem(last=False)[1].close()

    def _proxy_for(self, scheme: str, host: str) -> str | None:
        proxy = self._proxies.get(scheme)
        if proxy and not urllib.request.proxy_bypass_environment(host, self._proxies):
            return proxy
        return None

    def _headers(self) -> dict[str, str]:
        return {
            "User-Agent": self.opts.user_agent,
            "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
            "Accept-Encoding": "identity",
        }

    def _timeout(self) -> FetchError:
        return FetchError("timeout", f"no complete answer within {self.opts.timeout:g}s")


def _inflate(data: bytes, encoding: str, limit: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(data, limit + 1)  # a compression bomb stops at the limit
    except zlib.error as e:
        raise FetchError("bad_encoding", f"{encoding}: {e}") from None
    if len(out) > limit:
        raise FetchError("too_large", f"decompressed body over max_bytes {limit}")
    return out
