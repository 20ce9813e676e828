"""A loopback HTTP server (127.0.0.1, port 0) that serves files the way real servers misbehave,
for the download tests (not collected by pytest: no ``test_`` prefix).

- ``files``: {URL path: bytes}; anything else is a 404.
- Range requests get 206 + Content-Range (and an ETag, for If-Range), or, with
  ``honour_range=False``, the whole file with 200, as servers that ignore Range do.
- ``drop_after``: {URL path: n}: the next response for that path announces the full
  Content-Length, sends ``n`` bytes of the body and closes the connection (once per entry).
- ``delay``: seconds to wait before answering a file request (a slow first byte), so that
  concurrent clients overlap.
- ``requests``: (path, Range header or None, status) of every request, to check what a client did.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time


class WeightsServer:
    def __init__(self, files: dict[str, bytes], *, honour_range: bool = True, delay: float = 0.0):
        self.files = dict(files)
        self.honour_range = honour_range
        self.delay = delay
        self.drop_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None, int]] = []
        self._lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "WeightsServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, path: str) -> int:
        return sum(1 for p, _, _ in self.requests if p == path)

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                data = server.files.get(path)
                rng = self.headers.get("Range")
                if data is None:
                    self._record(path, rng, 404)
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                start = 0
                if rng and server.honour_range and self.headers.get("If-Range", etag) == etag:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data) and start:
                    self._record(path, rng, 416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206 if start else 200
                self._record(path, rng, status)
                time.sleep(server.delay)
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                with server._lock:
                    cut = server.drop_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _record(self, path: str, rng: str | None, status: int) -> None:
                with server._lock:
                    server.requests.append((path, rng, status))

        return Handler
