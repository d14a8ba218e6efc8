"""Hostile and recording peers on loopback: what an attacker would point the backend at."""
import socket
import threading
import time


class Listener:
    """A TCP listener on loopback that hands every accepted connection to `handle` on its own thread."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        raise NotImplementedError

    def close(self):
        self._stop = True
        self.sock.close()


class Capture(Listener):
    """Records every connection and every byte sent on it (it answers 404).

    `connections` counts TCP connections accepted, so a test can assert "no request at all"."""

    def __init__(self):
        self.received: list[bytes] = []
        super().__init__()

    @property
    def connections(self) -> int:
        return len(self.received)

    def handle(self, conn):
        conn.settimeout(2)
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 1 << 20:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        self.received.append(data)  # recorded before answering: the test reads it once the answer is in
        try:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        finally:
            conn.close()


class Trickle(Listener):
    """An HTTP server that answers every request one byte every `every` seconds (headers included)."""

    def __init__(self, every: float = 1.0, body: bytes = b"\x89PNG" + b"x" * 10000):
        self.every, self.body = every, body
        self.requests = 0
        super().__init__()

    def handle(self, conn):
        self.requests += 1
        reply = (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(self.body)
                 + self.body)
        try:
            conn.recv(65536)
            for i in range(len(reply)):
                if self._stop:
                    break
                conn.sendall(reply[i:i + 1])
                time.sleep(self.every)
        except OSError:
            pass
        finally:
            conn.close()
