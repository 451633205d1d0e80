"""http_fetch against a loopback server: deadlines hold against slow drips, every failure has a kind."""

from __future__ import annotations

import socket
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from mmflow.data.http_fetch import Fetcher, FetchError, FetchOptions, is_disallowed
from tests.data.http_server import LoopbackServer, jpeg


@pytest.fixture(scope="module")
def srv():
    with LoopbackServer() as s:
        yield s


def fetch(url: str, **opts) -> bytes:
    f = Fetcher(FetchOptions(**{"retry_backoff": 0.01, **opts}))
    try:
        return f.get(url).data
    finally:
        f.close()


def failure(url: str, **opts) -> FetchError:
    with pytest.raises(FetchError) as e:
        fetch(url, **opts)
    return e.value


def test_images_over_one_kept_alive_connection():
    with LoopbackServer() as s:
        f = Fetcher(FetchOptions())
        got = [f.get(s.url(f"/img/{i}.jpg")) for i in range(5)]
        f.close()
        assert [g.data for g in got] == [jpeg(i) for i in range(5)]
        assert got[0].content_type == "image/jpeg" and got[0].attempts == 1
        assert s.connections == 1


def test_a_connection_closed_by_the_server_while_idle_is_replaced():
    with LoopbackServer(idle_timeout=0.2) as s:
        f = Fetcher(FetchOptions(retries=0))
        assert f.get(s.url("/img/1.jpg")).data == jpeg(1)
        time.sleep(0.6)  # the server drops the idle connection
        assert f.get(s.url("/img/2.jpg")).data == jpeg(2)
        f.close()
        assert s.connections == 2


def test_http_errors_permanent_fail_at_once_transient_are_retried(srv):
    e = failure(srv.url("/status/404/1"), retries=2)
    assert (e.kind, e.attempts, srv.hits["/status/404/1"]) == ("http_404", 1, 1)
    assert "HTTP 404" in e.message
    e = failure(srv.url("/status/500/1"), retries=2)
    assert (e.kind, e.attempts, srv.hits["/status/500/1"]) == ("http_500", 3, 3)
    assert e.transient and not FetchError("http_404", "").transient


@pytest.mark.parametrize("route", ["/drip/1.jpg", "/drip_headers/1"])
def test_a_slow_drip_cannot_outlast_the_deadline(srv, route):
    start = time.monotonic()
    e = failure(srv.url(route), timeout=1.0, retries=1)
    elapsed = time.monotonic() - start
    assert e.kind == "timeout" and e.attempts == 2
    assert 2.0 <= elapsed < 3.0  # two attempts of 1 s (a per-read timeout would wait 60 s)


def test_redirects_are_followed_within_a_bound_and_loops_are_caught(srv):
    assert fetch(srv.url("/redirect/3/7.jpg"), max_redirects=3) == jpeg(7)
    assert failure(srv.url("/redirect/3/7.jpg"), max_redirects=2).kind == "too_many_redirects"
    e = failure(srv.url("/loop/1"))
    assert e.kind == "redirect_loop" and srv.hits["/loop/1"] == 1


def test_x_robots_tag_opt_outs(srv):
    e = failure(srv.url("/noai/1.jpg"))
    assert e.kind == "opt_out" and "noai" in e.message
    assert fetch(srv.url("/scoped/1.jpg")) == jpeg(1)  # aimed at another crawler
    assert fetch(srv.url("/noai/1.jpg"), disallowed_directives=()) == jpeg(1)


def test_is_disallowed_follows_img2dataset_rules():
    def headers(*values):
        m = Message()
        for v in values:
            m["X-Robots-Tag"] = v
        return m

    d = ("noai", "noimageai")
    assert is_disallowed(headers("noindex, NoAI"), d, "mmflow")
    assert is_disallowed(headers("mmflow: noimageai"), d, "mmflow")
    assert is_disallowed(headers("img2dataset: noai"), d, "mmflow")
    assert not is_disallowed(headers("googlebot: noai"), d, "mmflow")
    assert not is_disallowed(headers("nofollow"), d, "mmflow")
    assert is_disallowed(headers("nofollow", "noai"), d, None)


def test_byte_limit_with_and_without_a_length(srv):
    assert failure(srv.url("/big/1"), max_bytes=1 << 20).kind == "too_large"
    start = time.monotonic()
    assert failure(srv.url("/endless/1"), max_bytes=1 << 20).kind == "too_large"
    assert time.monotonic() - start < 2


def test_gzip_body_is_decoded(srv):
    assert fetch(srv.url("/gzip/4.jpg")) == jpeg(4)


def test_refused_and_invalid(srv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    e = failure(f"http://127.0.0.1:{port}/x.jpg", retries=1)
    assert e.kind == "connection" and e.attempts == 2
    assert failure("ftp://example.com/x.jpg").kind == "invalid_url"
    assert failure("not a url").kind == "invalid_url"
    assert failure("http://").kind == "invalid_url"


def test_http_proxy_from_the_environment(srv, monkeypatch):
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", srv.base)
    before = srv.hits["__proxied__"]
    assert fetch("http://images.example.invalid/img/3.jpg") == jpeg(3)
    assert srv.hits["__proxied__"] == before + 1


class _Redirector(BaseHTTPRequestHandler):
    """On 127.0.0.1: 302 to the ``to`` query parameter (any host), counting requests."""

    hits: list = []

    def do_GET(self):
        _Redirector.hits.append(self.path)
        to = parse_qs(urlsplit(self.path).query)["to"][0]
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def redirector():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Redirector.hits = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


PRIVATE = {
    "http://127.0.0.2:9/x.jpg": "loopback",
    "http://2130706434:9/x.jpg": "loopback",  # 127.0.0.2 in decimal
    "http://[::1]:9/x.jpg": "loopback",
    "http://[::ffff:127.0.0.2]:9/x.jpg": "loopback",
    "http://169.254.169.254/latest/meta-data/": "link-local",
    "http://[fd00:ec2::254]/latest/meta-data/": "private",
    "http://100.100.100.200/latest/meta-data/": "non-global",
    "http://10.1.2.3/x.jpg": "private",
    "http://192.168.0.1/x.jpg": "private",
    "http://0.0.0.0:9/x.jpg": "unspecified",
}


@pytest.mark.parametrize("url", PRIVATE)
def test_private_addresses_are_refused_before_connecting(url, monkeypatch):
    """Refused from the resolved address, before any connection (none is even attempted)."""

    def no_connect(*a, **k):
        raise AssertionError("connected")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    e = failure(url, refuse_private_addresses=True)
    assert e.kind == "private_address" and e.message.endswith(f"({PRIVATE[url]})")


def test_private_addresses_are_refused_on_every_hop(redirector, srv):
    """A public-looking first hop (127.0.0.1 allowed here) redirecting to a private address:
    the redirect target is refused, never requested."""
    opts = {"refuse_private_addresses": True, "allow_networks": ("127.0.0.1/32",)}
    for target in ("http://127.0.0.2:9/x.jpg", "http://169.254.169.254/latest/meta-data/"):
        e = failure(f"{redirector}/r?to={target}", **opts)
        assert e.kind == "private_address", e
    assert len(_Redirector.hits) == 2
    # the allowed network is fetched, also after a redirect to it
    assert fetch(f"{redirector}/r?to={srv.url('/img/3.jpg')}", **opts) == jpeg(3)
    # and with the option off (the default for the library), loopback is fetched as before
    assert fetch(f"{redirector}/r?to={srv.url('/img/4.jpg')}") == jpeg(4)


def test_a_garbled_status_line_is_not_echoed():
    """http.client puts what the server sent into its exceptions: the message keeps the type."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"SECRET-BODY-BYTES not http at all\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    e = failure(f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg", retries=0)
    listener.close()
    assert e.kind == "protocol" and "SECRET" not in str(e), e
