"""Every request this backend sends: strict URLs, an address guard, and a deadline for the whole.

- A URL is parsed once by a grammar stricter than any client's (no userinfo, whitespace, control
  characters, backslashes, non-ASCII or numeric-trick hosts, odd ports), and the request goes to the
  canonical form of what was parsed, after checking that urllib3 reads that form the same way: the
  host we check is the host the client connects to.
- Addresses are checked after DNS: every address a name resolves to must be allowed, and the socket
  connects only to a checked address. Loopback, private, link-local, reserved and multicast addresses
  are refused unless the policy allows them (as Label Studio's own SSRF guard does).
- One deadline covers connecting, headers and body: when it passes the socket is shut down.
- Redirects are followed here, one hop at a time, each hop parsed and guarded like the first, and the
  caller decides per hop which headers go with it (see `client.LabelStudio.auth`).

This module never decides about tokens.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from .watchdog import WATCHDOG

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5


class Refused(Exception):
    """The URL, or the address it leads to, is not allowed. Never retried."""


class TooLarge(Exception):
    """The answer is larger than the caller's limit."""


class DeadlineExceeded(Exception):
    """The whole request (connect, headers, body) took longer than its deadline."""


# ---- URLs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class URL:
    scheme: str  # http | https
    host: str  # lower case; an IPv6 literal without brackets
    port: int
    target: str  # path and query, starting with "/"

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.target}"


_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<target>[/?][^#]*)?(?:#.*)?",
                  re.S)
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?))"
                   r"(?::(?P<port>[0-9]{1,5}))?")
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters and backslashes, anywhere


def parse_url(text) -> URL:
    """An http(s) URL that every parser reads the same way, or Refused saying why not."""
    if not isinstance(text, str) or not text.strip():
        raise Refused("not a URL")
    if len(text) > 8192:
        raise Refused("URL longer than 8192 characters")
    text = text.strip(" \t\r\n")
    if _UNSAFE.search(text):
        raise Refused("URL contains whitespace, a control character or a backslash")
    m = _URL.fullmatch(text)
    if m and " " in m["scheme"] + m["authority"]:
        raise Refused("URL contains whitespace in its host")
    if not m:
        raise Refused("not an absolute http(s) URL")
    scheme = m["scheme"].lower()
    if scheme not in DEFAULT_PORTS:
        raise Refused(f"{scheme}:// URLs are not fetched (only http and https)")
    authority = m["authority"]
    if "@" in authority:
        raise Refused("URL carries a user name or password")
    h = _HOST.fullmatch(authority)
    if not h:
        raise Refused("URL host is not a plain host name, IPv4 or [IPv6] address with an optional port")
    port = int(h["port"]) if h["port"] is not None else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise Refused(f"URL port {port} is out of range")
    if h["v6"] is not None:
        try:
            host = ipaddress.IPv6Address(h["v6"]).compressed
        except ValueError:
            raise Refused("URL host is not a valid IPv6 address") from None
    else:
        host = h["name"].lower()
        labels = host.rstrip(".").split(".")
        # "0x7f.1", "2130706433" or "0177.0.0.1" are names to us but addresses to the C resolver.
        if all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise Refused("URL host is a numeric form that is not a canonical IPv4 address") from None
    # Spaces and non-ASCII in the path or query are percent-encoded, as a browser would; the host is ASCII.
    target = quote(m["target"] or "/", safe="/?&=%:@!$'()*+,;~-._")
    if not target.startswith("/"):
        target = "/" + target
    url = URL(scheme, host, port, target)
    _same_to_urllib3(url)
    return url


def _same_to_urllib3(url: URL) -> None:
    """The client must read our canonical form exactly as we do (host, port, path), or we do not send it."""
    try:
        theirs = urllib3.util.parse_url(str(url))
    except Exception:
        raise Refused("URL is read differently by the HTTP client") from None
    host = (theirs.host or "").strip("[]").lower()
    port = theirs.port or DEFAULT_PORTS.get(theirs.scheme or "", 0)
    if (theirs.scheme, host, port, theirs.path or "/") != (url.scheme, url.host, url.port, url.path):
        raise Refused("URL is read differently by the HTTP client")


def join(base: URL, location: str) -> URL:
    """A redirect's Location, relative to the URL that answered it, parsed as strictly as any URL."""
    if not isinstance(location, str) or _UNSAFE.search(location.strip(" ")):
        raise Refused("redirect Location is not a clean URL")
    location = location.strip(" \t")
    if "://" in location.split("?", 1)[0]:
        return parse_url(location)
    if location.startswith("//"):
        return parse_url(f"{base.scheme}:{location}")
    root = str(URL(base.scheme, base.host, base.port, "/"))[:-1]
    if location.startswith("/"):
        return parse_url(root + location)
    directory = base.path.rsplit("/", 1)[0]
    return parse_url(f"{root}{directory}/{location}")


# ---- which addresses may be connected to ---------------------------------------------------------
def is_public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6:
        # An IPv6 form that embeds an IPv4 address is as public as that address.
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is not None:
            addr = embedded
    return addr.is_global and not addr.is_multicast


@dataclass(frozen=True)
class Policy:
    """Where requests may go: public addresses always; others only when allowed here.

    `hosts` are (name, port or None) pairs allowed by the URL's host; `networks` allow by the address
    connected to; `exempt` origins (Label Studio's) are allowed whatever they resolve to.
    """

    allow_private: bool = False
    hosts: frozenset = frozenset()
    networks: tuple = ()
    exempt: frozenset = frozenset()

    @classmethod
    def parse(cls, allow_private: bool = False, allowed: str = "") -> "Policy":
        """`allowed`: comma-separated host names, host:port pairs and CIDR networks."""
        hosts, networks = set(), []
        for item in (s.strip() for s in (allowed or "").split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
                continue
            except ValueError:
                pass
            host, _, port = item.rpartition(":") if re.fullmatch(r".+:[0-9]{1,5}", item) else (item, "", "")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
                raise ValueError(f"SAM3_ALLOWED_HOSTS: {item!r} is not a host, host:port or CIDR network")
            hosts.add((host.lower(), int(port) if port else None))
        return cls(allow_private, frozenset(hosts), tuple(networks))

    def exempting(self, origin: tuple[str, str, int]) -> "Policy":
        return Policy(self.allow_private, self.hosts, self.networks, self.exempt | {origin})

    def permits(self, origin: tuple[str, str, int], ip: str) -> bool:
        if self.allow_private or origin in self.exempt or is_public(ip):
            return True
        _, host, port = origin
        if (host, None) in self.hosts or (host, port) in self.hosts:
            return True
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        return any(addr in net for net in self.networks if net.version == addr.version)


# ---- the guarded transport -----------------------------------------------------------------------
_current = threading.local()  # the deadline of the request this thread is sending


@dataclass
class _Deadline:
    seconds: float
    conns: list = field(default_factory=list)
    expired: bool = False

    def expire(self) -> None:
        self.expired = True
        for conn in self.conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns now
                except OSError:
                    pass


def _connect(conn: HTTPConnection, scheme: str, policy: Policy) -> socket.socket:
    """Resolve, check every address, then connect only to a checked one."""
    origin = (scheme, conn.host.strip("[]").lower(), conn.port)
    try:
        infos = socket.getaddrinfo(conn._dns_host, conn.port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NameResolutionError(conn.host, conn, e) from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    refused = [ip for ip in addresses if not policy.permits(origin, ip)]
    if refused:  # one bad record is enough: a rebinding name can hand out both kinds
        raise Refused(f"{conn.host} resolves to a non-public address ({refused[0]}); "
                      "allow it with SAM3_ALLOWED_HOSTS or SAM3_ALLOW_PRIVATE_URLS")
    last: OSError | None = None
    for ip in addresses:
        deadline = getattr(_current, "deadline", None)
        if deadline is not None and deadline.expired:
            raise ConnectTimeoutError(conn, f"deadline passed while connecting to {conn.host}")
        try:
            return urllib3.util.connection.create_connection(
                (ip, conn.port), conn.timeout, source_address=conn.source_address,
                socket_options=conn.socket_options)
        except socket.timeout as e:
            raise ConnectTimeoutError(conn, f"connecting to {conn.host} timed out") from e
        except OSError as e:
            last = e
    raise NewConnectionError(conn, f"Failed to establish a new connection: {last}")


def _watched(conn) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.conns.append(conn)


def _session(policy: Policy) -> requests.Session:
    class Guarded:
        """Connects through `_connect` and puts itself under this thread's deadline."""

        scheme = ""

        def _new_conn(self):
            return _connect(self, self.scheme, policy)

        def connect(self):
            _watched(self)
            return super().connect()

        def request(self, *args, **kwargs):
            _watched(self)
            return super().request(*args, **kwargs)

    class Conn(Guarded, HTTPConnection):
        scheme = "http"

    class SConn(Guarded, HTTPSConnection):
        scheme = "https"

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class SPool(HTTPSConnectionPool):
        ConnectionCls = SConn

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SPool}

    session = requests.Session()
    session.trust_env = False  # no proxies (they would hide the address) and no ~/.netrc credentials
    session.mount("http://", Adapter(max_retries=0, pool_maxsize=16))
    session.mount("https://", Adapter(max_retries=0, pool_maxsize=16))
    return session


@dataclass
class Reply:
    status: int
    headers: dict  # requests' case-insensitive headers
    body: bytes
    url: URL

    def json(self):
        import json

        return json.loads(self.body)


class Client:
    """Requests under one address policy; each call has one deadline for all of it."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.session = _session(policy)

    def send(self, method: str, url: URL, *, timeout: float, max_bytes: int, headers: dict | None = None,
             auth: Callable[[URL], dict] | None = None, follow: bool = False, **kw) -> Reply:
        """One request (and, with `follow`, its redirects), read whole, within `timeout` seconds.

        `auth(url)` gives the extra headers for each hop. Raises Refused, TooLarge, DeadlineExceeded
        or requests' RequestException.
        """
        deadline = _Deadline(timeout)
        alarm = WATCHDOG.arm(timeout, deadline.expire)
        _current.deadline = deadline
        try:
            for _ in range(MAX_REDIRECTS + 1):
                hop = {"Accept-Encoding": "identity", **(headers or {}), **(auth(url) if auth else {})}
                reply = self._once(method, url, hop, alarm, max_bytes, deadline, **kw)
                location = reply.headers.get("Location")
                if not (follow and reply.status in REDIRECTS and location):
                    return reply
                url = join(url, location)
                method, kw = ("GET", {}) if reply.status == 303 or method != "GET" else (method, kw)
            raise Refused(f"more than {MAX_REDIRECTS} redirects")
        finally:
            alarm.cancel()
            _current.deadline = None

    def _once(self, method, url: URL, headers, alarm, max_bytes, deadline, **kw) -> Reply:
        left = alarm.remaining
        if left <= 0:
            raise DeadlineExceeded(f"no time left for {method} {url.host}")
        try:
            with self.session.request(method, str(url), headers=headers, timeout=(min(left, 10.0), left),
                                      stream=True, allow_redirects=False, **kw) as r:
                length = r.headers.get("Content-Length", "")
                if length.isascii() and length.isdigit() and int(length) > max_bytes:
                    raise TooLarge(f"{url.host} announced {int(length)} bytes, over the {max_bytes} byte limit")
                body = bytearray()
                for chunk in r.iter_content(1 << 16):
                    body += chunk
                    if len(body) > max_bytes:
                        raise TooLarge(f"{url.host} sent more than {max_bytes} bytes")
                return Reply(r.status_code, r.headers, bytes(body), url)
        except ValueError as e:  # a header or URL that cannot be sent as it is (requests' InvalidHeader too)
            raise Refused(f"request to {url.host} cannot be sent: {type(e).__name__}") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            if deadline.expired:
                raise DeadlineExceeded(f"{method} {url.host} took longer than {deadline.seconds:.0f} s") from None
            if isinstance(e, requests.RequestException):
                raise
            raise requests.ConnectionError(str(e)) from None
        finally:
            deadline.conns.clear()


def data_uri(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI, refused before decoding when they would exceed `max_bytes`."""
    import base64
    import binascii

    header, sep, payload = text.partition(",")
    if not sep or ";base64" not in header.lower():
        raise Refused("data: URI is not base64")
    if len(payload) * 3 // 4 > max_bytes:
        raise TooLarge(f"data: URI holds more than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise Refused("data: URI is not valid base64") from None
