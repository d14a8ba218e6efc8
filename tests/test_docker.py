"""The compose stack as people run it (`make docker-test`): the project's own Dockerfile and CPU compose file,
with the tiny checkpoint mounted as a local model, driven through Label Studio's API as a person's clicks would
drive it. Where no registry is reachable the public base images are local stand-ins (tests/docker/standins.sh).

Also the start-up failures people meet with Docker: a CUDA device on a machine without one, a checkpoint the
container's user cannot read. `COMPOSE` picks the Compose to run ("docker compose" or "docker-compose").
"""
import json
import os
import secrets
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import free_port, make_image, png_bytes

from backend.sam3.checkpoints import build_checkpoint

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[1]
COMPOSE = shlex.split(os.environ.get("COMPOSE", "docker compose"))
IMAGE = "label-studio-sam3:latest"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>"""
THRESHOLDS = {"confidence": 0.0, "max_detections": 2}  # the tiny random model scores everything ~0.25


def sh(*args, check=True, timeout=900, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and run.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} exited {run.returncode}:\n{run.stdout[-3000:]}\n"
                             f"{run.stderr[-3000:]}")
    return run


def wait(what, ok, timeout, every=2.0, details=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ok():
                return
        except requests.RequestException:
            pass
        time.sleep(every)
    raise AssertionError(f"{what} did not happen in {timeout} s\n{details()}")


class Stack:
    def __init__(self, tmp: Path):
        self.name = f"sam3test{uuid.uuid4().hex[:6]}"
        self.models = tmp / "models"
        build_checkpoint(self.models / "sam3-tiny")  # written 0644: readable by the container's uid 1000
        self.token, self.password = secrets.token_hex(20), secrets.token_hex(8)
        self.auth = ("label-studio", secrets.token_hex(16))
        self.ls_port, self.backend_port = free_port(), free_port()
        self.env_file = tmp / "stack.env"
        self.env_file.write_text("\n".join([
            f"LABEL_STUDIO_API_KEY={self.token}", f"LABEL_STUDIO_PASSWORD={self.password}",
            f"BASIC_AUTH_USER={self.auth[0]}", f"BASIC_AUTH_PASS={self.auth[1]}",
            "SAM3_MODEL=/models/sam3-tiny", f"SAM3_MODELS_DIR={self.models}",
            f"LABEL_STUDIO_PORT={self.ls_port}", f"BACKEND_PORT={self.backend_port}", "LOG_LEVEL=INFO", ""]))
        self.ls = f"http://127.0.0.1:{self.ls_port}"
        self.backend = f"http://127.0.0.1:{self.backend_port}"
        self.headers = {"Authorization": f"Token {self.token}"}

    def compose(self, *args, **kw):
        return sh(*COMPOSE, "-p", self.name, "--env-file", self.env_file, "-f", ROOT / "docker-compose.yml", *args,
                  cwd=ROOT, **kw)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert ids, f"no container for {service}"
        return ids[0]

    def inspect(self, service: str) -> dict:
        return json.loads(sh("docker", "inspect", self.container(service)).stdout)[0]["State"]

    def health(self, service: str) -> str:
        return (self.inspect(service).get("Health") or {}).get("Status", "none")

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    s.compose("build")
    try:
        s.compose("up", "-d")
        wait("Label Studio answering", lambda: requests.get(s.ls + "/health", timeout=5).status_code == 200, 600,
             details=s.logs)
        for service in ("backend", "worker", "redis"):
            wait(f"{service} healthy", lambda: s.health(service) == "healthy", 300, details=s.logs)
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", check=False, timeout=300)


def test_the_compose_stack_connects_clicks_and_labels_through_the_worker(stack):
    s = stack
    r = requests.post(f"{s.ls}/api/projects", headers=s.headers, json={"title": "docker", "label_config": CONFIG})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    # Connect Model, as the form does it: the compose service name and the Basic auth from .env
    r = requests.post(f"{s.ls}/api/ml", headers=s.headers, json={
        "url": "http://backend:9090", "project": pid, "title": "SAM 3", "is_interactive": True,
        "auth_method": "BASIC_AUTH", "basic_auth_user": s.auth[0], "basic_auth_pass": s.auth[1],
        "extra_params": json.dumps({"thresholds": THRESHOLDS})})
    assert r.status_code == 201, r.text
    ml = r.json()
    assert ml["state"] == "CO", ml
    r = requests.post(f"{s.ls}/api/projects/{pid}/import", headers=s.headers,
                      files={"file": ("cat.png", png_bytes(make_image(160, 120, seed=3)), "image/png")})
    assert r.status_code == 201, r.text
    [task] = requests.get(f"{s.ls}/api/tasks", params={"project": pid}, headers=s.headers).json()["tasks"]
    # A click in the labelling view: Label Studio forwards it to the backend, which fetches the upload with the
    # admin's token from inside the compose network
    click = {"result": [{"original_width": 160, "original_height": 120, "image_rotation": 0,
                         "value": {"x": 40.0, "y": 50.0, "width": 0.5, "keypointlabels": ["cat"]},
                         "is_positive": True, "id": "k1", "from_name": "kp", "to_name": "image",
                         "type": "keypointlabels", "origin": "manual"}]}
    r = requests.post(f"{s.ls}/api/ml/{ml['id']}/interactive-annotating", headers=s.headers,
                      json={"task": task["id"], "context": click})
    assert r.status_code == 200, r.text
    regions = r.json()["data"]["result"]
    assert regions and all(g["value"]["polygonlabels"] == ["cat"] for g in regions), r.json()
    # A job, queued in Redis and run by the worker container. Its own thresholds make its own model_version:
    # Label Studio may already have stored the connection's prediction for the task (it predicts on its own
    # when a task list is read), which the job would rightly skip.
    job_thresholds = {**THRESHOLDS, "max_detections": 3}
    r = requests.post(f"{s.backend}/jobs", auth=s.auth, json={"project": pid, "thresholds": job_thresholds})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    done = {}

    def finished():
        done.update(requests.get(f"{s.backend}/jobs/{job_id}", auth=s.auth, timeout=10).json())
        return done["status"] not in ("queued", "running")

    wait("the job", finished, 300, every=1, details=lambda: f"{done}\n{s.logs()}")
    assert done["status"] == "succeeded" and done["predicted"] == 1, done
    assert list(done["workers"]) and all(not w.startswith("sam3-jobs") for w in done["workers"]), done["workers"]
    stored = requests.get(f"{s.ls}/api/predictions", params={"task": task["id"]}, headers=s.headers).json()
    [mine] = [p for p in stored if p["model_version"] == done["model_version"]]
    assert mine["result"] and all(g["value"]["polygonlabels"][0] in ("cat", "dog") for g in mine["result"])
    assert {p["model_version"] for p in stored} <= {done["model_version"], ml["model_version"]}, stored
    # Every service as docker sees it
    assert {svc: s.health(svc) for svc in ("backend", "worker", "redis")} == dict.fromkeys(
        ("backend", "worker", "redis"), "healthy")
    assert s.inspect("label-studio")["Running"]
    health = requests.get(f"{s.backend}/health", auth=s.auth).json()
    assert (health["model_state"], health["device"]) == ("ready", "cpu")  # DEVICE=auto on a machine without a GPU
    uid = sh("docker", "exec", s.container("backend"), "id", "-u").stdout.strip()
    assert uid == "1000"


def test_a_worker_reports_unhealthy_when_redis_goes_away(stack):
    s = stack
    s.compose("stop", "redis")
    try:
        worker = s.container("worker")
        wait("the worker's report to see Redis gone", lambda: sh(
            "docker", "exec", worker, "label-studio-sam3", "health", "--worker", check=False).returncode == 1, 60)
        out = sh("docker", "exec", worker, "label-studio-sam3", "health", "--worker", check=False)
        assert "cannot reach Redis" in out.stderr, out
    finally:
        s.compose("start", "redis")
    wait("worker healthy again", lambda: sh("docker", "exec", s.container("worker"), "label-studio-sam3", "health",
                                            "--worker", check=False).returncode == 0, 120)


@pytest.mark.parametrize("case", ["cuda on a machine without one", "weights the container's user cannot read"])
def test_a_model_that_cannot_load_says_why_in_health_and_the_log(stack, tmp_path, case):
    s = stack
    models = tmp_path / "models"
    folder = build_checkpoint(models / "sam3")
    env = ["-e", "SAM3_MODEL=/models/sam3", "-e", "LOG_LEVEL=INFO"]
    if case.startswith("cuda"):
        env += ["-e", "DEVICE=cuda"]
        words = "CUDA is not available"
    else:
        (folder / "model.safetensors").chmod(0o600)  # root's, as a checkpoint written with a 0600 umask
        words = "permission denied"
    name = f"{s.name}-fail-{uuid.uuid4().hex[:4]}"
    sh("docker", "run", "-d", "--name", name, *env, "-v", f"{models}:/models:ro", IMAGE, "serve")
    try:
        def failed():
            out = sh("docker", "exec", name, "label-studio-sam3", "health", check=False)
            return out.returncode == 1 and words in out.stdout

        wait("/health to report the failure", failed, 120, every=1, details=lambda: sh("docker", "logs", name).stderr)
        out = sh("docker", "exec", name, "label-studio-sam3", "health", check=False).stdout
        assert out.startswith("failed:"), out
        if words == "permission denied":
            assert "uid 1000" in out and "model.safetensors" in out and "No such file" not in out, out
        log = sh("docker", "logs", name).stderr
        assert log.count(words) == 1, log[-3000:]  # once, with the fix, not once per retry
    finally:
        sh("docker", "rm", "-f", name, check=False)


@pytest.mark.parametrize("compose", [["docker", "compose"], ["docker-compose"]])
def test_both_composes_accept_the_cpu_file_and_the_gpu_overlay(stack, compose):
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", ROOT / f)]
        out = sh(*compose, "--env-file", stack.env_file, *args, "config", cwd=ROOT).stdout
        gpu = "nvidia" in out
        assert gpu == ("docker-compose.gpu.yml" in files), out[:2000]
