"""An HTTP proxy in front of a real Label Studio that misbehaves on purpose.

Every `every`-th request gets a fault, cycling through `kinds`:
- "429": answered 429 with Retry-After, never forwarded;
- "500": answered 500, never forwarded;
- "500-after": forwarded (Label Studio applies it), then answered 500;
- "drop-before": the connection is closed without forwarding;
- "drop-after": forwarded (applied), then the connection is closed without an answer.
`script` maps a path fragment to faults for the first requests whose path contains it, in order
(so a test is sure that, say, a bulk import is applied and then reported as failed).
`delay` slows every request, so that tests can act while a job is in flight.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class FaultProxy:
    def __init__(self, target: str, every: int = 0, kinds=("429", "500-after", "drop-before", "drop-after"),
                 delay: float = 0.0, script: dict[str, list[str]] | None = None):
        self.target = target.rstrip("/")
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.every, self.kinds, self.delay = every, list(kinds), delay
        self.count = 0
        self.faults: Counter = Counter()  # (kind, method, path prefix) -> n
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind = proxy._next_fault(self.path)
                if proxy.delay:
                    time.sleep(proxy.delay)
                where = (self.command, self.path.split("?")[0].rsplit("/", 1)[0])
                if kind:
                    with proxy._lock:
                        proxy.faults[(kind, *where)] += 1
                if kind == "429":
                    return self._reply(429, b'{"detail": "slow down"}', {"Retry-After": "1"})
                if kind == "500":
                    return self._reply(500, b'{"detail": "injected"}', {})
                if kind == "drop-before":
                    return self._drop()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                resp = requests.request(self.command, proxy.target + self.path, headers=headers, data=body,
                                        timeout=60, allow_redirects=False)
                if kind == "500-after":
                    return self._reply(500, b'{"detail": "injected"}', {})
                if kind == "drop-after":
                    return self._drop()
                out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
                self._reply(resp.status_code, resp.content, out)

            def _reply(self, code, content, headers):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def _drop(self):
                self.close_connection = True
                self.connection.shutdown(2)

            do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            for fragment, kinds in self.script.items():
                if fragment in path and kinds:
                    return kinds.pop(0)
            self.count += 1
            if self.every and self.count % self.every == 0:
                return self.kinds[(self.count // self.every - 1) % len(self.kinds)]
            return None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
