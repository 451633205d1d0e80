"""A loopback HTTP server for ingest tests and the ingest benchmark: good images and every failure.

Routes (``n`` is any number; images differ by ``n``):

    /img/{n}.jpg          a small JPEG (``?w=&h=`` for its size, ``?delay=`` seconds first)
    /photo/{n}.jpg        one of 64 web-sized photo-like JPEGs (for the benchmark)
    /png/{n}.png          an RGBA PNG
    /status/{code}/{n}    that HTTP status
    /html/{n}             an HTML page, status 200
    /truncated/{n}.jpg    the first 60% of a JPEG, served as a complete response
    /bomb/{n}.png         a 600-byte PNG whose header claims 40000 x 40000 pixels
    /noai/{n}.jpg         a JPEG with ``X-Robots-Tag: noai``
    /scoped/{n}.jpg       a JPEG with ``X-Robots-Tag: otherbot: noai`` (not for us)
    /loop/{n}             302 -> /loop/{n}/b -> 302 -> /loop/{n}
    /redirect/{k}/{n}.jpg k redirects, then the JPEG
    /drip/{n}.jpg         headers, then one body byte a second for 60 s
    /drip_headers/{n}     the status line, then one header byte a second
    /flaky/{n}.jpg        503 until ``server.healed`` is set, then the JPEG
    /big/{n}              a Content-Length of 1 GB (sends nothing)
    /endless/{n}          a chunked body that never ends
    /gzip/{n}.jpg         a JPEG sent with Content-Encoding: gzip

``hits`` counts requests per path; ``connections`` counts accepted TCP connections. HTTP/1.1
keep-alive is on unless ``keep_alive=False`` (every answer then closes its connection). A request line with an absolute URL (a proxy request) is served by its path
and counted in ``proxied``.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import threading
import time
import zlib
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image


@lru_cache(maxsize=4096)
def jpeg(n: int, w: int = 24, h: int = 16, quality: int = 90) -> bytes:
    img = Image.new("RGB", (w, h), ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256))
    img.paste((255 - (n * 37) % 256, 0, 0), (0, 0, max(1, w // 3), max(1, h // 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@lru_cache(maxsize=64)
def noisy_jpeg(n: int, w: int = 320, h: int = 240) -> bytes:
    """A photo-like JPEG big enough that truncating it cuts the scan data."""
    import numpy as np

    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=90)
    return buf.getvalue()


PHOTO_SIZES = ((640, 480), (500, 375), (800, 600), (480, 640), (1024, 683), (400, 400))


def photo(n: int) -> bytes:
    """One of 64 photo-like JPEGs (gradients, shapes, grain), web-sized: 400 to 1024 px, ~50 KB."""
    return _photo(n % 64)


@lru_cache(maxsize=64)
def _photo(n: int) -> bytes:
    import numpy as np
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(1000 + n)
    w, h = PHOTO_SIZES[n % len(PHOTO_SIZES)]
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    c = rng.uniform(40, 215, (3, 3))
    px = np.stack([c[i, 0] + c[i, 1] * x - c[i, 2] * y * 0.5 for i in range(3)], -1)
    img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(10, max(w, h) // 4))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            (x0 - r, y0 - r, x0 + r, y0 + r), fill=fill
        )
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    grain = rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img, float) + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


@lru_cache(maxsize=64)
def png_rgba(n: int) -> bytes:
    img = Image.new("RGBA", (20, 20), (n % 256, 0, 0, 0))
    img.paste((0, 0, 255, 255), (5, 5, 15, 15))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@lru_cache(maxsize=4)
def bomb_png(side: int = 40_000) -> bytes:
    """A real PNG header (valid CRC) claiming ``side`` x ``side`` pixels, with a tiny IDAT."""
    data = bytearray(png_rgba(0))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    timeout = 10  # an idle keep-alive connection is closed after this many seconds
    server: LoopbackServer

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
        super().setup()

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: C901 - one branch per route reads best here
        target = self.path
        if target.startswith("http://"):
            self.server.count("__proxied__")
            target = urlsplit(target).path + (
                "?" + urlsplit(target).query if urlsplit(target).query else ""
            )
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        self.server.count(path)
        n = int((re.findall(r"\d+", path) or ["0"])[-1])
        route = path.split("/")[1] if path.count("/") >= 1 else ""
        if route == "img":
            w, h = int(query.get("w", ["24"])[0]), int(query.get("h", ["16"])[0])
            time.sleep(float(query.get("delay", ["0"])[0]))
            return self.send(200, jpeg(n, w, h), "image/jpeg")
        if route == "photo":
            return self.send(200, photo(n), "image/jpeg")
        if route == "png":
            return self.send(200, png_rgba(n), "image/png")
        if route == "status":
            return self.send(int(path.split("/")[2]), b"nope", "text/plain")
        if route == "html":
            page = b"<!DOCTYPE html><html><body>not an image</body></html>"
            return self.send(200, page, "text/html")
        if route == "truncated":
            data = noisy_jpeg(n % 8)
            return self.send(200, data[: len(data) * 6 // 10], "image/jpeg")
        if route == "bomb":
            return self.send(200, bomb_png(), "image/png")
        if route == "noai":
            return self.send(200, jpeg(n), "image/jpeg", {"X-Robots-Tag": "noai"})
        if route == "scoped":
            return self.send(200, jpeg(n), "image/jpeg", {"X-Robots-Tag": "otherbot: noai"})
        if route == "loop":
            nxt = f"/loop/{n}" if path.endswith("/b") else f"/loop/{n}/b"
            return self.send(302, b"", "text/plain", {"Location": nxt})
        if route == "redirect":
            k = int(path.split("/")[2])
            nxt = f"/redirect/{k - 1}/{n}.jpg" if k > 1 else f"/img/{n}.jpg"
            return self.send(302, b"", "text/plain", {"Location": nxt})
        if route == "drip":
            return self.drip_body(n)
        if route == "drip_headers":
            return self.drip_headers()
        if route == "flaky":
            if not self.server.healed.is_set():
                return self.send(503, b"busy", "text/plain")
            return self.send(200, jpeg(n), "image/jpeg")
        if route == "big":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            return None
        if route == "endless":
            return self.endless()
        if route == "gzip":
            return self.send(
                200, gzip.compress(jpeg(n)), "image/jpeg", {"Content-Encoding": "gzip"}
            )
        return self.send(404, b"no such route", "text/plain")

    def send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if not self.server.keep_alive:  # one connection per request, as with many distinct hosts
            self.send_header("Connection", "close")
            self.close_connection = True
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def drip_body(self, n: int) -> None:
        data = jpeg(n)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        self._drip(data[:60])

    def drip_headers(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self._drip(b"X-Slow: " + b"a" * 60)

    def endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"\xff" * 65536
        try:
            while not self.server.stopping.is_set():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass
        self.close_connection = True

    def _drip(self, data: bytes) -> None:
        """One byte a second; stops when the client goes away or the server stops."""
        try:
            for b in data:
                if self.server.stopping.wait(1.0):
                    break
                self.wfile.write(bytes([b]))
                self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout: float = 10.0,
        keep_alive: bool = True,
    ):
        self.idle_timeout, self.keep_alive = idle_timeout, keep_alive
        super().__init__((host, port), Handler)
        self.hits: Counter = Counter()
        self.connections = 0
        self.healed = threading.Event()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-answer (deadlines, limits) is what the tests provoke

    def get_request(self):
        request = super().get_request()
        with self._lock:
            self.connections += 1
        return request

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def main() -> None:
    """``python -m tests.data.http_server [--port P]``: serve until killed (for the benchmark)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--keep-alive", action="store_true", help="allow persistent connections")
    args = ap.parse_args()
    for n in range(64):  # render the photos before the first request, not during the timing
        photo(n)
    srv = LoopbackServer(port=args.port, keep_alive=args.keep_alive)
    print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
