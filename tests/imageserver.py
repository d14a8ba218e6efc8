"""A real HTTP server on loopback that serves images and records the headers it was sent."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    def __init__(self, files: dict[str, bytes], token: str | None = None, refresh: dict[str, str] | None = None,
                 answers: dict[str, tuple[int, dict]] | None = None):
        """`token`: the Authorization value images need ("Token x" or "Bearer y"; a bare value means Token).
        `refresh`: refresh token -> access token, answered at POST /api/token/refresh/ like Label Studio.
        `answers`: path -> (status, headers) answered as is (redirects, odd headers), before any check."""
        self.files, self.requests, self.refresh, self.answers = files, [], refresh or {}, answers or {}
        self.token = token if token is None or " " in token else f"Token {token}"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, dict(self.headers)))
                if self.path.split("?")[0] in outer.answers:
                    status, headers = outer.answers[self.path.split("?")[0]]
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                if outer.token and self.headers.get("Authorization") != outer.token:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = outer.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                outer.requests.append((self.path, dict(self.headers)))
                access = outer.refresh.get(body.get("refresh"))
                payload = json.dumps({"access": access} if access else {"detail": "invalid"}).encode()
                self.send_response(200 if (self.path == "/api/token/refresh/" and access) else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
