"""Tried as an attacker would: the Label Studio token reaches Label Studio only, internal addresses are
not fetched, every input is bounded, and nothing a client or an image server sends makes a 5xx.

Every peer is real (HTTP servers and raw listeners on loopback); `Capture` counts TCP connections, so
"no request at all" means not even a connect.
"""
import base64
import json
import struct
import time
import zlib

import pytest
from conftest import CONFIG, data_uri, keypoint, make_image, png_bytes, rectangle, text
from imageserver import ImageServer
from peers import Capture

from backend.config import Settings
from backend.errors import BackendError
from backend.http.app import create_app
from backend.http.startup import problems
from backend.jobs.record import Job, JobRequest, JobStatus
from backend.jobs.store import MemoryStore
from backend.labelstudio.media import FETCH_FAILED
from backend.labelstudio.outbound import Policy, Refused, is_public, parse_url
from backend.labelstudio.retry import Backoff, retry_after

TOKEN = "0123456789abcdef0123456789abcdef01234567"


def jwt(exp: float) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'HS256'})}.{enc({'exp': exp, 'token_type': 'refresh'})}.c2ln"


def click(client, image, context=None, **extra):
    task = {"id": 7, "data": {"image": image}}
    ctx = context if context is not None else {"result": [keypoint(50, 50)]}
    return client.post("/predict", json={"tasks": [task], "project": "3.1700000000", "label_config": CONFIG,
                                         "params": {"context": ctx}, **extra})


def batch(client, images):
    tasks = [{"id": i, "data": {"image": im}} for i, im in enumerate(images)]
    return client.post("/predict", json={"tasks": tasks, "project": "3.1700000000", "label_config": CONFIG})


def hostile_urls(ls: str, cap: str) -> list[str]:
    """Image references that mean Label Studio to one parser and the capture server to another."""
    ls_hp, cap_hp = ls.split("//")[1], cap.split("//")[1]
    cap_port = cap_hp.split(":")[1]
    media = "/data/upload/3/a.png"
    return [
        f"http://{cap_hp}\\@{ls_hp}{media}",  # urlsplit: Label Studio; requests: the capture server
        f"http://{cap_hp}\\\\@{ls_hp}{media}",
        f"http://{ls_hp}@{cap_hp}{media}",  # userinfo
        f"http://user:{TOKEN}@{cap_hp}{media}",
        f"http://{cap_hp}#@{ls_hp}{media}",  # fragment before the "real" host
        f"http://{cap_hp}?@{ls_hp}{media}",
        f"http://{cap_hp}%2f@{ls_hp}{media}",
        f"http://{ls_hp}:{cap_port}{media}",  # two ports
        f" http://{cap_hp}{media}",
        f"http://{cap_hp}\t{media}",
        f"http://{ls_hp}\r\nX: y{media}",
        f"http://{cap_hp}\x00{media}",
        f"HTTP://{cap_hp}{media}",
        f"http://[::ffff:127.0.0.1]:{cap_port}{media}",
        f"http://2130706433:{cap_port}{media}",  # decimal 127.0.0.1
        f"http://0x7f.1:{cap_port}{media}",
        f"http://0177.0.0.1:{cap_port}{media}",
        f"http://127.1:{cap_port}{media}",
        f"http://127.0.0.1.:{cap_port}{media}",
        f"http://ｌｏｃａｌｈｏｓｔ:{cap_port}{media}",  # full-width letters: IDNA maps them to "localhost"
        f"http://localhost:{cap_port}{media}",  # a name that resolves inward
        f"//{cap_hp}{media}",  # protocol-relative
        f"/\\{cap_hp}{media}",
        f"\\\\{cap_hp}{media}",
        "/data/upload/../../api/projects/",  # a Label Studio API path, with the token, via dot segments
        "/data/upload/%2e%2e/%2e%2e/api/projects/",
        "/data/upload/..%2f..%2fapi/projects/",
        f"{ls}/api/projects/",  # Label Studio's origin but not media: no token
        f"{ls}/data/upload/../../api/projects/",
        "h:1:2",
        "http://[::1",
        f"ftp://{cap_hp}{media}",
        "file:///etc/passwd",
        f"gopher://{cap_hp}/_x",
    ]


def assert_token_only_on_media(ls: ImageServer, secrets: list[str], start: int = 0):
    """What Label Studio was sent from the first click on (before it: /setup's check of the token)."""
    for path, headers in ls.requests[start:]:
        carried = headers.get("Authorization", "")
        if carried:
            assert path.startswith("/data/upload/3/") or path == "/api/token/refresh/", (path, carried)
            assert ".." not in path and "%2e" not in path.lower(), path
        if not path.startswith(("/data/upload/3/", "/api/token/refresh/")):
            assert not carried, path
    for path, headers in ls.requests[start:]:
        assert not path.startswith("/api/projects"), path  # never reached through a crafted path


@pytest.mark.parametrize("kind", ["env-legacy", "setup-legacy", "env-pat"])
@pytest.mark.parametrize("allow_private", [False, True])
def test_no_crafted_url_sends_the_token_anywhere_else(settings, engine, kind, allow_private):
    pat, access = jwt(time.time() + 86400), jwt(time.time() + 300)
    expect = f"Bearer {access}" if kind == "env-pat" else f"Token {TOKEN}"
    ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token=expect, refresh={pat: access})
    capture = Capture()
    settings.allow_private_urls = allow_private
    try:
        if kind.startswith("env"):
            settings.label_studio_url, settings.label_studio_api_key = ls.url, pat if kind == "env-pat" else TOKEN
        client = create_app(settings, engine=engine).test_client()
        if kind == "setup-legacy":
            r = client.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": ls.url,
                                            "access_token": TOKEN})
            assert r.status_code == 200
            assert [p for p, _ in ls.requests] == ["/api/projects/3"]  # /setup checked the token it was given
        start = len(ls.requests)
        urls = hostile_urls(ls.url, capture.url)
        for url in urls:
            r = click(client, url)
            assert r.status_code in (400, 422), (url, r.status_code, r.get_json())
            assert "error" in r.get_json()
        r = batch(client, urls)  # one prediction per task, each empty: none could be read
        assert r.status_code == 200 and len(r.get_json()["results"]) == len(urls)
        assert all("result" not in p and p["error"] for p in r.get_json()["results"])  # failures, not results
        ok = click(client, "/data/upload/3/a.png")  # and the real thing still works
        assert ok.status_code == 200, ok.get_json()
    finally:
        ls.close()
        capture.close()
    assert ls.requests[-1][1].get("Authorization") == expect
    assert_token_only_on_media(ls, [TOKEN, pat, access], start)
    if not allow_private:
        assert capture.connections == 0, capture.received  # not even a TCP connect
    for data in capture.received:  # allowed to connect, but never with a secret
        for secret in (TOKEN, pat, access, "Authorization"):
            assert secret.encode() not in data, data


def test_setup_cannot_redirect_the_env_token(settings, engine):
    """With LABEL_STUDIO_URL and its key set, /setup's hostname is never used: the key stays home."""
    for key in (TOKEN, jwt(time.time() + 86400)):
        access = jwt(time.time() + 300)
        ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())},
                         token=f"Token {TOKEN}" if key == TOKEN else f"Bearer {access}", refresh={key: access})
        capture = Capture()
        try:
            settings.label_studio_url, settings.label_studio_api_key = ls.url, key
            client = create_app(settings, engine=engine).test_client()
            r = client.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": capture.url,
                                            "access_token": "attacker"})
            assert r.status_code == 200
            r = click(client, "/data/upload/3/a.png")
            assert r.status_code == 200, r.get_json()
        finally:
            ls.close()
            capture.close()
        assert capture.connections == 0
        assert [p for p, _ in ls.requests][-1] == "/data/upload/3/a.png"


def test_a_setup_token_goes_only_to_its_own_host(settings, engine):
    ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token=TOKEN)
    other = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token=None)
    try:
        client = create_app(settings, engine=engine).test_client()
        client.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": ls.url, "access_token": TOKEN})
        client.post("/setup", json={"project": "4.1", "schema": CONFIG, "hostname": other.url, "access_token": "x"})
        assert click(client, "/data/upload/3/a.png").status_code == 200
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/3/a.png"}}],
                                          "project": "4.1", "label_config": CONFIG,
                                          "params": {"context": {"result": [keypoint(50, 50)]}}})
        assert r.status_code == 200
    finally:
        ls.close()
        other.close()
    assert all(h.get("Authorization") in (None, "Token x") for _, h in other.requests)
    assert [(p, h.get("Authorization")) for p, h in ls.requests] == [
        ("/api/projects/3", f"Token {TOKEN}"), ("/data/upload/3/a.png", f"Token {TOKEN}")]  # /setup's check, the image


def test_redirects_never_carry_the_token_elsewhere(settings, engine):
    capture = Capture()
    ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token=TOKEN, answers={
        "/data/upload/3/away.png": (302, {"Location": f"{capture.url}/data/upload/3/a.png"}),
        "/data/upload/3/home.png": (302, {"Location": "/data/upload/3/a.png"}),
        "/data/upload/3/api.png": (302, {"Location": "/api/projects/"}),
        "/data/upload/3/loop.png": (302, {"Location": "/data/upload/3/loop.png"}),
    })
    try:
        settings.label_studio_url, settings.label_studio_api_key = ls.url, TOKEN
        client = create_app(settings, engine=engine).test_client()
        r = click(client, "/data/upload/3/away.png")  # to a private address: refused
        assert r.status_code == 422 and capture.connections == 0
        settings.allow_private_urls = True
        client = create_app(settings, engine=engine).test_client()
        r = click(client, "/data/upload/3/away.png")  # allowed, fetched without the token
        assert r.status_code == 422 and capture.connections == 1
        assert TOKEN.encode() not in capture.received[0] and b"Authorization" not in capture.received[0]
        assert click(client, "/data/upload/3/home.png").status_code == 200  # media to media keeps it
        assert click(client, "/data/upload/3/api.png").status_code == 422
        r = click(client, "/data/upload/3/loop.png")
        assert r.status_code == 422
    finally:
        ls.close()
        capture.close()
    api = [h for p, h in ls.requests if p.startswith("/api/")]
    assert api and all("Authorization" not in h for h in api)
    assert sum(p == "/data/upload/3/loop.png" for p, _ in ls.requests) == 6  # five redirects, then it stops


# ---- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("env, words", [
    ({"label_studio_api_key": TOKEN}, "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY go together"),
    ({"label_studio_url": "http://ls:8080"}, "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY go together"),
    ({"basic_auth_pass": "x"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS go together"),
    ({"basic_auth_user": "x"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS go together"),
    ({"allowed_hosts": "not a host!"}, "SAM3_ALLOWED_HOSTS"),
    ({"label_studio_url": "http://a\\@b", "label_studio_api_key": "k"}, "LABEL_STUDIO_URL is not usable"),
])
def test_settings_that_would_leak_or_silently_skip_auth_are_refused(checkpoint, env, words):
    settings = Settings(model=checkpoint, device="cpu", **env)
    assert any(words in p for p in problems(settings))
    with pytest.raises(ValueError, match=words.split()[0]):
        create_app(settings)


def test_setup_with_a_crafted_hostname_is_a_400(settings, engine):
    client = create_app(settings, engine=engine).test_client()
    for host in ["http://a\\@b:1", "javascript:alert(1)", "http://[::1", "h:1:2", ["http://x"], 7]:
        r = client.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": host, "access_token": "t"})
        assert r.status_code == 400, (host, r.get_json())


# ---- SSRF --------------------------------------------------------------------------------------------
def test_internal_addresses_are_refused_alike_and_never_connected_to(settings, engine):
    capture = Capture()
    port = capture.port
    urls = [f"http://127.0.0.1:{port}/x.png", f"http://localhost:{port}/x.png", f"http://[::1]:{port}/x.png",
            f"http://0.0.0.0:{port}/x.png", "http://10.1.2.3/x.png", "http://192.168.0.1/x.png",
            "http://172.16.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/x",
            f"http://[::ffff:127.0.0.1]:{port}/x.png", "http://127.0.0.1:6379/", "http://224.0.0.1/x",
            "http://[fe80::1]/x", "http://[fd00::1]/x", "http://240.0.0.1/x"]
    try:
        client = create_app(settings, engine=engine).test_client()
        answers = {url: click(client, url) for url in urls}
    finally:
        capture.close()
    assert capture.connections == 0
    for url, r in answers.items():
        assert (r.status_code, r.get_json()) == (422, {"error": FETCH_FAILED}), url


def test_a_fetch_failure_reads_the_same_whatever_the_cause(settings, engine):
    """No port scanner: a closed port, a 404 and a 500 give the caller one message."""
    server = ImageServer({}, answers={"/500": (500, {}), "/401": (401, {})})
    closed = Capture()
    closed.close()
    settings.allowed_hosts = "127.0.0.0/8"
    settings.fetch_retries = 1
    try:
        client = create_app(settings, engine=engine).test_client()
        answers = [click(client, url) for url in [
            f"{server.url}/404.png", f"{server.url}/500", f"{server.url}/401", f"{closed.url}/x.png",
            "http://10.9.9.9/x.png"]]
    finally:
        server.close()
    assert {(r.status_code, r.get_data()) for r in answers} == {(422, answers[0].get_data())}
    assert answers[0].get_json() == {"error": FETCH_FAILED}


def test_allowed_hosts_and_allow_private_open_the_guard(settings, engine):
    server = ImageServer({"/a.png": png_bytes(make_image())})
    host, port = server.url.split("//")[1].split(":")
    try:
        for allowed, private, ok in [("", False, False), (f"127.0.0.1:{port}", False, True),
                                     ("127.0.0.0/8", False, True), ("127.0.0.1:1", False, False),
                                     ("10.0.0.0/8", False, False), ("", True, True)]:
            settings.allowed_hosts, settings.allow_private_urls = allowed, private
            r = click(create_app(settings, engine=engine).test_client(), f"{server.url}/a.png")
            assert r.status_code == (200 if ok else 422), (allowed, private, r.get_json())
    finally:
        server.close()


def test_address_policy_units():
    assert not is_public("127.0.0.1") and not is_public("::1") and not is_public("::ffff:10.0.0.1")
    assert not is_public("2002:7f00:1::") and not is_public("0.0.0.0") and not is_public("ff02::1")
    assert is_public("93.184.216.34") and is_public("2606:4700::1111")
    p = Policy.parse(False, "minio:9000, images.internal, 10.0.0.0/8")
    assert p.permits(("http", "minio", 9000), "172.18.0.5") and not p.permits(("http", "minio", 80), "172.18.0.5")
    assert p.permits(("http", "images.internal", 80), "192.168.1.1")
    assert p.permits(("http", "x", 80), "10.2.3.4") and not p.permits(("http", "x", 80), "192.168.1.1")
    assert p.exempting(("http", "ls", 8080)).permits(("http", "ls", 8080), "127.0.0.1")
    with pytest.raises(ValueError):
        Policy.parse(False, "a b")
    for bad in ["http://a@b/", "http://a\\b/", "http://a:0/", "http://[::1", "http://0x7f.1/", "http://a/\x00"]:
        with pytest.raises(Refused):
            parse_url(bad)
    assert str(parse_url("HTTP://Example.com:80/a?b=1#frag")) == "http://example.com/a?b=1"
    # what real image URLs carry is encoded, not refused: spaces, brackets, non-ASCII in the path or query
    assert str(parse_url("http://a.b/my photo[1].png?q=ä")) == "http://a.b/my%20photo%5B1%5D.png?q=%C3%A4"
    with pytest.raises(Refused):
        parse_url("http://a b/x.png")


def test_only_known_image_formats_are_opened(client_factory):
    client = client_factory()
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    r = click(client, "data:application/postscript;base64," + base64.b64encode(eps).decode())
    assert r.status_code == 422 and "not a readable image" in r.get_json()["error"]
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        uri = "data:image/x;base64," + base64.b64encode(png_bytes(make_image(), fmt)).decode()
        assert click(client, uri).status_code == 200, fmt


@pytest.fixture
def client_factory(settings, engine):
    def make(**overrides):
        for k, v in overrides.items():
            setattr(settings, k, v)
        return create_app(settings, engine=engine).test_client()
    return make


# ---- bounded cost ------------------------------------------------------------------------------------
def _png_declaring(width: int, height: int) -> bytes:
    """A small real PNG whose header claims width x height (a pixel bomb; truncated data)."""
    data = bytearray(png_bytes(make_image(8, 8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(png_bytes(make_image(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data[:633])  # truncated, as in the report


@pytest.mark.parametrize("make", [_png_declaring, _jpeg_declaring])
def test_pixel_bombs_are_refused_from_the_header(client_factory, make):
    bomb = make(10000, 9999)
    assert len(bomb) < 20000
    client = client_factory()
    t0 = time.perf_counter()
    r = click(client, "data:image/png;base64," + base64.b64encode(bomb).decode())
    assert r.status_code == 413 and "10000x9999 pixels" in r.get_json()["error"]
    assert time.perf_counter() - t0 < 2  # nothing was decoded


def test_bodies_over_the_limit_are_413_before_any_work(client_factory, engine):
    client = client_factory(max_body_mb=0.05)
    before = engine.vit_passes
    r = click(client, data_uri(make_image(300, 300, seed=77)))
    assert r.status_code == 413 and "error" in r.get_json()
    assert engine.vit_passes == before


def test_prompt_limits_are_400_before_any_download_or_encode(client_factory, engine):
    server = ImageServer({"/a.png": png_bytes(make_image(seed=31))})
    client = client_factory(allowed_hosts="127.0.0.0/8", max_prompts=8, max_prompt_chars=50)
    before = engine.vit_passes
    try:
        cases = [({"result": [text("x" * 51)]}, "at most 50"),
                 ({"result": [keypoint(10, 10)] * 9}, "at most 8"),
                 ({"result": [rectangle(1, 1, 2, 2)] * 9}, "at most 8"),
                 ({"result": [keypoint(10, 10, name="nope")]}, "unknown control"),
                 ({"result": [keypoint(10**400, 10)]}, "must be a number")]
        for context, words in cases:
            t0 = time.perf_counter()
            r = click(client, f"{server.url}/a.png", context)
            assert r.status_code == 400 and words in r.get_json()["error"], (context, r.get_json())
            assert time.perf_counter() - t0 < 0.5
    finally:
        server.close()
    assert server.requests == [] and engine.vit_passes == before


def test_a_megabyte_prompt_never_reaches_the_tokenizer(engine):
    enc = engine.encode(make_image(seed=5))
    with pytest.raises(BackendError, match="too long"):
        engine.detect(enc, ["word " * 200000])


def test_detect_keeps_only_max_keep_queries_per_prompt(engine):
    enc = engine.encode(make_image(seed=6))
    full = engine.detect(enc, ["cat", "dog"], threshold=0.0)
    kept = engine.detect(enc, ["cat", "dog"], threshold=0.0, max_keep=2)
    assert [len(d) for d in full] == [8, 8]  # the tiny model has 8 queries, all over 0
    assert [len(d) for d in kept] == [2, 2]
    for f, k in zip(full, kept):  # the best ones, best first
        assert list(k.scores) == pytest.approx(sorted(f.scores, reverse=True)[:2])


def test_projects_in_memory_are_bounded(client_factory):
    client = client_factory(max_projects=5)
    for i in range(40):
        assert client.post("/setup", json={"project": f"{i}.1", "schema": CONFIG}).status_code == 200
    projects = client.application.config["projects"]
    assert list(projects._items) == [str(i) for i in range(35, 40)]


def test_jobs_and_their_task_lists_are_bounded():
    def job(job_id, status, created):
        return Job(id=job_id, status=JobStatus(status), project=1, model_version="m", request=JobRequest(),
                   label_config="", created_at=created, scope=f"dry-{job_id}")

    store = MemoryStore(max_jobs=2)
    store.create(job("a", "queued", 1.0))
    store.create(job("b", "running", 2.0))
    with pytest.raises(BackendError) as e:
        store.create(job("c", "queued", 3.0))
    assert e.value.status == 429
    store.transition("a", (JobStatus.QUEUED,), status=JobStatus.SUCCEEDED, finished_at=time.time())
    store.create(job("c", "queued", 3.0))  # the finished job makes room
    assert store.get("a") is None and store.get("c") is not None
    with pytest.raises(BackendError) as e:
        JobRequest.parse({"project": 1, "tasks": list(range(1, 12))}, max_tasks=10)
    assert e.value.status == 413
    for bad in [{"project": "²"}, {"project": True}, {"project": 1, "limit": 10**400},
                {"project": 1, "tasks": [1.5]}, {"project": 1, "chunk_size": -1}]:
        with pytest.raises(BackendError):
            JobRequest.parse(bad)


def test_metric_labels_come_from_fixed_sets(client_factory):
    client = client_factory()
    for method in ("FOOBAR", "X" * 100, "PROPFIND"):
        client.open("/health", method=method)
    text_ = client.get("/metrics").get_data(as_text=True)
    assert "FOOBAR" not in text_ and "PROPFIND" not in text_ and 'method="OTHER"' in text_


def test_retry_after_is_bounded_and_sane():
    assert retry_after({"Retry-After": "nan"}) is None and retry_after({"Retry-After": "inf"}) is None
    assert retry_after({"Retry-After": "-5"}) == 0.0 and retry_after({"Retry-After": "Tue, 99 Foo"}) is None
    assert Backoff().delay(1, after=1e9) == 30.0


def test_odd_image_server_headers_are_4xx(client_factory):
    server = ImageServer({}, answers={"/cl.png": (200, {"Content-Length": "abc"}),
                                      "/ra.png": (503, {"Retry-After": "nan"}),
                                      "/ra2.png": (429, {"Retry-After": "99999999999999999999999"})})
    client = client_factory(allowed_hosts="127.0.0.0/8", fetch_retries=2, fetch_timeout=5)
    try:
        for path in ("/cl.png", "/ra.png", "/ra2.png"):
            t0 = time.perf_counter()
            r = click(client, server.url + path)
            assert r.status_code == 422, (path, r.get_json())
            assert time.perf_counter() - t0 < 6
    finally:
        server.close()


# ---- auth --------------------------------------------------------------------------------------------
def test_basic_auth_with_any_characters_is_never_a_500(client_factory):
    client = client_factory(basic_auth_user="ännä", basic_auth_pass="pässwörd✓")
    good = base64.b64encode("ännä:pässwörd✓".encode()).decode()
    assert client.get("/health", headers={"Authorization": f"Basic {good}"}).status_code == 200
    for header in ["Basic " + base64.b64encode("ännä:wrong".encode()).decode(), "Basic ü", "Basic", "Bearer x",
                   "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(), "Basic " + "A" * 10000]:
        r = client.get("/health", headers={"Authorization": header.encode().decode("latin-1")})
        assert r.status_code == 401, header[:40]


# ---- the 500s of the report, one by one -------------------------------------------------------------------
def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("route, body", [
    ("/setup", _deep(1000)),
    ("/predict", '{"tasks": ' + _deep(1000) + "}"),
    ("/webhook", '{"a": ' + _deep(5000) + "}"),
    ("/setup", json.dumps({"project": "1.1", "schema": ["<View/>"]})),
    ("/setup", json.dumps({"project": "1.1", "schema": CONFIG, "hostname": {"a": 1}})),
    ("/setup", json.dumps({"project": "1.1", "schema": CONFIG, "access_token": 5})),
    ("/setup", json.dumps({"project": "²", "schema": CONFIG})),
    ("/setup", json.dumps({"project": "1.1", "schema": CONFIG, "extra_params": {"thresholds": {"confidence": 10**400}}})),
    ("/setup", json.dumps({"project": "1.1", "schema": CONFIG, "hostname": "h:1:2"})),
    ("/setup", json.dumps({"project": "1.1", "schema": CONFIG, "hostname": "http://[::1"})),
    ("/predict", json.dumps({"tasks": [{"id": 1, "data": {"image": ["x"]}}], "label_config": CONFIG,
                             "params": {"context": {"result": [keypoint(10, 10)]}}})),
    ("/predict", json.dumps({"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": 5})),
    ("/predict", json.dumps({"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": CONFIG,
                             "params": {"context": {"result": [dict(keypoint(1, 1), from_name=["kp"])]}}})),
    ("/predict", json.dumps({"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": CONFIG,
                             "params": {"context": {"result": [dict(keypoint(1, 1), type=7)]}}})),
    ("/predict", '{"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": "<View/>", "params": '
                 '{"context": {"result": [{"from_name": "kp", "type": "keypointlabels", "value": {"x": Infinity}}]}}}'),
    ("/predict", json.dumps({"tasks": [{"id": 1, "data": {"image": "http://[::1"}}], "label_config": CONFIG,
                             "params": {"context": {"result": [keypoint(10, 10)]}}})),
    ("/predict", json.dumps({"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": CONFIG,
                             "project": "²"})),
    ("/jobs", json.dumps({"project": "²"})),
    ("/predict", b'{"tasks": "\xff\xfe"}'),
    ("/predict", '{"tasks": NaN}'),
])
def test_reported_500s_are_4xx_now(client_factory, route, body):
    client = client_factory()
    r = client.post(route, data=body, content_type="application/json")
    assert 400 <= r.status_code < 500, (r.status_code, r.get_data()[:300])
    assert "error" in r.get_json()


def test_a_non_ascii_basic_auth_password_does_not_break_every_request(client_factory):
    client = client_factory(basic_auth_user="u", basic_auth_pass="ü")
    assert client.get("/health").status_code == 401
    ok = base64.b64encode("u:ü".encode()).decode()
    assert client.get("/health", headers={"Authorization": f"Basic {ok}"}).status_code == 200
