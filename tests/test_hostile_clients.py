"""The served process (`label-studio-sam3 serve`, gunicorn) against slow peers and a seeded fuzzer.

Slow peers: clients that trickle their request and image servers that trickle their answer must not
take the request threads; `/health` and a warm click still answer at once. Fuzz: thousands of
hostile bodies to every route; no 5xx, and the one worker process lives on.
"""
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import CONFIG, data_uri, free_port, keypoint, make_image, rectangle, text, wait_http
from peers import Trickle

EXE = str(Path(sys.executable).with_name("label-studio-sam3"))
READ_TIMEOUT, FETCH_TIMEOUT = 3, 4


@pytest.fixture(scope="module")
def trickle():
    server = Trickle(every=1.0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def served(checkpoint, trickle, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("served") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "SAM3_"))}
    env.update(SAM3_MODEL=checkpoint, DEVICE="cpu", SAM3_READ_TIMEOUT=str(READ_TIMEOUT),
               SAM3_FETCH_TIMEOUT=str(FETCH_TIMEOUT), SAM3_ALLOWED_HOSTS=f"127.0.0.1:{trickle.port}",
               SAM3_MAX_BODY_MB="1")
    with open(log, "wb") as out:
        # every interface, no auth: as people start it by mistake (it must say so)
        proc = subprocess.Popen([EXE, "serve", "--host", "0.0.0.0", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, 120, log)
        while requests.get(url + "/health").json()["model_state"] == "loading":
            time.sleep(0.2)
        yield url, port, log, proc
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # a graceful stop on SIGTERM


def test_serving_on_every_interface_without_auth_warns(served):
    log = served[2].read_text()
    assert "serving on 0.0.0.0 without authentication" in log and "BASIC_AUTH_USER" in log


WARM = data_uri(make_image(seed=4242))


def click(url, image=WARM, timeout=60):
    return requests.post(url + "/predict", timeout=timeout, json={
        "tasks": [{"id": 1, "data": {"image": image}}], "project": "1.1", "label_config": CONFIG,
        "params": {"context": {"result": [keypoint(40, 50)]}}})


def trickle_request(port, head: bytes, results, i, every=0.5):
    """Send `head` at once, then a byte every `every` s; record how long until the server hung up."""
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(1)
    answer = b""
    try:
        s.sendall(head)
        while time.monotonic() - t0 < 60:
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            except socket.timeout:
                pass
            try:
                s.sendall(b"x")
            except OSError:
                break
            time.sleep(every)
    finally:
        s.close()
    results[i] = (time.monotonic() - t0, answer)


def test_slow_clients_and_slow_image_servers_cannot_starve_the_service(served, trickle):
    url, port, log, _ = served
    assert click(url).status_code == 200  # the warm image: encoded and cached
    body_head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{")
    header_head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
    slow = {}
    threads = [threading.Thread(target=trickle_request, args=(port, body_head if i < 16 else header_head, slow, i))
               for i in range(20)]
    clicks = {}

    def slow_image(i):
        t0 = time.monotonic()
        r = click(url, f"{trickle.url}/img{i}.png")
        clicks[i] = (time.monotonic() - t0, r.status_code, r.json())

    threads += [threading.Thread(target=slow_image, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every slow peer holds its request thread now
    assert trickle.requests >= 16
    t0 = time.monotonic()
    assert requests.get(url + "/health", timeout=10).status_code == 200
    health = time.monotonic() - t0
    t0 = time.monotonic()
    assert click(url, timeout=10).status_code == 200
    warm = time.monotonic() - t0
    for t in threads:
        t.join(90)
    assert health < 2 and warm < 2, (health, warm)
    # every trickled request was cut off at the read deadline, with a 408 where the body was being read
    for i, (took, answer) in slow.items():
        assert took < READ_TIMEOUT + 3, (i, took, answer)
        if i < 16:
            assert answer.startswith(b"HTTP/1.1 408"), answer
    # every click on a trickling image server answered once the fetch deadline passed
    assert len(clicks) == 16
    for took, status, body in clicks.values():
        assert status == 422 and took < FETCH_TIMEOUT + 3, (took, status, body)


def test_a_body_over_the_limit_is_413_without_reading_it(served):
    url, port, _, _ = served
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 50000000\r\n\r\n{")
    s.settimeout(5)
    answer = b""
    while b"SAM3_MAX_BODY_MB" not in answer:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    s.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"SAM3_MAX_BODY_MB" in answer, answer


# ---- fuzz ------------------------------------------------------------------------------------------
def _hostile(rng: random.Random):
    """A value chosen to break a parser or a type assumption."""
    choices = [
        None, True, False, 0, -1, 2**63, 10**400, 1e308, -1e308, 0.5, "", " ", "x" * 5000, "²", "١٢", "NaN",
        "h:1:2", "http://[::1", "http://127.0.0.1:6379/", "http://a\\@127.0.0.1:1/", "//127.0.0.1:1/x",
        "/data/upload/../../api/", "data:image/png;base64,!!!", "data:,", "\x00", "\ud800", "😀" * 50,
        "<View>", "<View><Image name='i' value='$image'/></View>", "1.1", "-1", "1e400",
        [], {}, [None], [[[[]]]], {"a": None}, {"": ""}, [1, "a", None], {"result": "x"},
        {"x": 10**400}, {"text": ["x"] * 3}, ["x"] * 200,
        "__DEEP__", "__NAN__", "__INF__",
    ]
    return rng.choice(choices)


def _mutate(value, rng: random.Random, depth=0):
    """A copy of `value` with a random spot replaced, deleted or added to."""
    if depth > 6 or not isinstance(value, (dict, list)) or not value or rng.random() < 0.25:
        return _hostile(rng)
    if isinstance(value, dict):
        out = dict(value)
        key = rng.choice(list(out))
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[rng.choice(["zz", "__proto__", "1", ""])] = _hostile(rng)
        else:
            out[key] = _mutate(out[key], rng, depth + 1)
        return out
    out = list(value)
    i = rng.randrange(len(out))
    roll = rng.random()
    if roll < 0.15:
        del out[i]
    elif roll < 0.25:
        out.extend([out[i]] * rng.randint(1, 5))
    else:
        out[i] = _mutate(out[i], rng, depth + 1)
    return out


def _encode(value, ascii_: bool) -> bytes:
    """JSON text, with what json.dumps will not write: deep nesting, NaN, -Infinity, lone surrogates."""
    text_ = json.dumps(value, ensure_ascii=ascii_)
    text_ = text_.replace('"__DEEP__"', "[" * 900 + "]" * 900).replace('"__NAN__"', "NaN")
    return text_.replace('"__INF__"', "-Infinity").encode("utf-8", "surrogatepass")


def _bodies(seed: int, n: int):
    rng = random.Random(seed)
    image = data_uri(make_image(16, 12, seed=1))
    context = {"result": [keypoint(40, 50), rectangle(10, 10, 30, 30), text("cat")]}
    valid = {
        "/setup": {"project": "3.1", "schema": CONFIG, "hostname": "http://127.0.0.1:9", "access_token": "t",
                   "extra_params": {"ontology": {"kitty": "cat"}, "thresholds": {"confidence": 0.4}}},
        "/predict": {"tasks": [{"id": 1, "data": {"image": image}}], "project": "3.1", "label_config": CONFIG,
                     "params": {"context": context}},
        "/webhook": {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}},
        "/jobs": {"project": 3, "tasks": [1, 2], "limit": 5, "thresholds": {"confidence": 0.5},
                  "ontology": ["cat"], "overwrite": False, "dry_run": True, "chunk_size": 2},
    }
    raw = [b"", b"{", b"[1,", b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b"null", b"1e999999", b'"x"', b"{}" * 1000,
           b'{"a":' * 5000, b"\x00" * 100]
    for i in range(n):
        route = rng.choice(list(valid))
        roll = rng.random()
        if roll < 0.05:
            yield route, rng.choice(raw)
        else:
            body = valid[route]
            for _ in range(rng.randint(1, 3)):
                body = _mutate(body, rng)
            yield route, _encode(body, rng.random() < 0.5)


def _check(status_code: int, content_type: str, what) -> None:
    assert status_code < 500, what
    assert content_type.startswith("application/json"), what


def test_fuzzed_bodies_never_get_a_5xx_in_process(settings, engine):
    from backend.http.app import create_app

    settings.fetch_timeout, settings.fetch_retries = 2, 1
    client = create_app(settings, engine=engine).test_client()
    deadline, count, statuses = time.monotonic() + 90, 0, {}
    for route, body in _bodies(seed=20261123, n=1200):
        r = client.post(route, data=body, content_type="application/json")
        _check(r.status_code, r.content_type, (route, body[:300], r.get_data()[:300]))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        count += 1
        if time.monotonic() > deadline:
            break
    for path in ["/jobs?limit=x", "/jobs?offset=-1", "/jobs?status=%00", "/jobs?limit=99999999999999999999",
                 "/jobs/%00", "/jobs/" + "a" * 5000, "/jobs/../../etc", "/health?x=" + "y" * 5000]:
        r = client.get(path)
        _check(r.status_code, r.content_type, path)
        _check(client.delete(path).status_code, "application/json", path)
    assert count >= 1200, count  # the bound is on time; this many must fit in it
    assert statuses.get(200, 0) > 50 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 500, statuses
    assert client.get("/health").status_code == 200


def test_fuzzed_bodies_never_get_a_5xx_from_the_served_process(served):
    url, port, log, proc = served
    session = requests.Session()
    for route, body in _bodies(seed=7, n=400):
        r = session.post(url + route, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        _check(r.status_code, r.headers.get("Content-Type", ""), (route, body[:300], r.text[:300]))
    for raw in [b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xfe\r\n\r\n",
                b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"FOO /setup HTTP/1.1\r\nHost: x\r\n\r\n"]:
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(10)
        s.sendall(raw)
        answer = s.recv(4096)
        s.close()
        assert not answer.startswith(b"HTTP/1.1 5"), answer
    assert proc.poll() is None and requests.get(url + "/health").status_code == 200
    assert log.read_text().count("Booting worker") == 1  # the worker never died and was never replaced
