"""The shipping files: docker-compose.yml, Dockerfile, .env.example and the README's label configs.

No Docker engine runs in CI, so the container commands are run directly, as the image would run them.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_port
from redis import Redis

from backend import cli
from backend.annotate.backend import SAM3Backend
from backend.annotate.labelconfig import LabelConfig
from backend.config import Settings
from backend.http import gunicorn
from backend.sam3.model import Sam3Model

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
EXE = str(Path(sys.executable).with_name("label-studio-sam3"))


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def gpu():
    return yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())


def dockerfile_instruction(name: str) -> list[str]:
    """The JSON (exec) form of a Dockerfile instruction, e.g. ENTRYPOINT or CMD."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(rf"^{name}\s+(?:--\S+\s+)*(?:CMD\s+)?(\[.*\])\s*$", text, re.M)
    assert match, f"Dockerfile has no exec-form {name}"
    return json.loads(match.group(1))


def container_argv(command: list[str]) -> list[str]:
    """The image's entrypoint + a command, with the console script as installed here."""
    argv = dockerfile_instruction("ENTRYPOINT") + command
    assert argv[0] == "label-studio-sam3"
    return [EXE, *argv[1:]]


def substitute(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?message} with nothing set: the default."""
    return re.sub(r"\$\{\w+(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(1) or "", str(value))


def test_compose_services_reference_the_dockerfile_and_each_other(compose):
    services = compose["services"]
    assert "name" not in compose  # Compose 1.29 rejects a top-level name
    assert {"label-studio", "redis", "backend", "worker"} <= set(services)
    for name in ("backend", "worker"):
        svc = services[name]
        assert svc["build"] == "." and (ROOT / "Dockerfile").exists()
        assert svc["image"] == services["backend"]["image"]  # one image, two commands
        assert set(svc["depends_on"]) <= set(services)
        env = svc["environment"]
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        assert "deploy" not in svc  # the default file runs on a machine without a GPU: the GPU is an overlay
        named = [v for v in svc["volumes"] if not v.startswith("${")]
        for volume in named:
            assert volume.split(":")[0] in compose["volumes"]
        assert any(v.endswith(":/data/huggingface") for v in named)  # weights download once
        assert "${SAM3_MODELS_DIR:-./models}:/models:ro" in svc["volumes"]  # local checkpoints, read-only
        assert svc["healthcheck"]["test"] == ["CMD", "label-studio-sam3", "health",
                                              "--serve" if name == "backend" else "--worker"]
    assert (ROOT / "models" / "README.md").exists()  # the default SAM3_MODELS_DIR, documented
    assert services["backend"]["command"] == dockerfile_instruction("CMD") == ["serve"]
    assert services["worker"]["command"] == ["worker"]
    assert "ports" not in services["worker"]  # so `--scale worker=N` works
    assert services["backend"]["ports"] == ["127.0.0.1:${BACKEND_PORT:-9090}:9090"]  # this machine only
    ls = services["label-studio"]
    assert ls["image"].startswith("heartexlabs/label-studio:")
    assert ls["environment"]["USE_DEFAULT_BANNED_SUBNETS"] == "false"
    assert ls["environment"]["LABEL_STUDIO_USER_TOKEN"] == services["backend"]["environment"]["LABEL_STUDIO_API_KEY"]
    assert ls["volumes"][0].split(":")[0] in compose["volumes"]
    for svc in services.values():
        for dep in svc.get("depends_on", []):
            assert dep in services


def test_the_gpu_overlay_reserves_gpus_and_its_extra_worker_is_the_same_worker(compose, gpu):
    for name in ("backend", "worker", "worker-gpu1"):
        [device] = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"]
    extra, worker = gpu["services"]["worker-gpu1"], compose["services"]["worker"]
    assert extra["profiles"] == ["gpu1"]
    for key in ("image", "command", "environment", "volumes", "healthcheck", "depends_on", "restart"):
        assert extra[key] == worker[key], key


def test_every_variable_compose_sets_is_read_by_the_code(compose, monkeypatch):
    read = set()

    class Recorder(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

    monkeypatch.setattr(os, "environ", Recorder(os.environ))
    Settings.from_env()
    cli.build_parser()
    from huggingface_hub.utils import get_token

    get_token()  # HF_TOKEN is read by huggingface_hub when the gated weights download
    for name in ("backend", "worker"):
        unread = set(compose["services"][name]["environment"]) - read
        assert not unread, f"{name} sets {sorted(unread)}, which nothing reads"


def test_env_example_and_compose_name_the_same_variables(compose):
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / "docker-compose.gpu.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert example == used, (sorted(example - used), sorted(used - example))
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == {"LABEL_STUDIO_API_KEY", "LABEL_STUDIO_PASSWORD", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"}


def service_env(compose, name, **overrides):
    env = {k: substitute(v) for k, v in compose["services"][name]["environment"].items()}
    return {**os.environ, **env, **overrides}


def run_until_ready(command, env, log, ready, during=lambda: None, timeout=120) -> str:
    """Run the container command until `ready()`, call `during()`, stop it with SIGTERM (it must exit 0)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(container_argv(command), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        during()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0  # a graceful stop
    finally:
        if proc.poll() is None:
            proc.kill()
    return log.read_text()


def assert_serving(url, last_check):
    assert last_check.stdout.startswith("ready:")
    assert requests.get(url + "/health").status_code == 401  # Basic auth from the environment
    assert requests.get(url + "/jobs", auth=("ls", "secret")).json()["total"] >= 0  # jobs go to Redis


@pytest.mark.redis  # a real Redis on 127.0.0.1:6379
def test_the_images_serve_command_and_healthcheck_work(compose, checkpoint, tmp_path):
    port = free_port()
    env = service_env(compose, "backend", SAM3_MODEL=checkpoint, DEVICE="cpu", PORT=str(port),
                      LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}", LABEL_STUDIO_API_KEY="x" * 40,
                      REDIS_URL=REDIS_URL, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="secret")
    health = dockerfile_instruction("HEALTHCHECK")
    assert health == ["label-studio-sam3", "health"]
    url = f"http://127.0.0.1:{port}"
    checks = []

    def healthy():
        checks.append(subprocess.run(container_argv(health[1:]), env=env, capture_output=True, text=True))
        return checks[-1].returncode == 0

    log = run_until_ready(compose["services"]["backend"]["command"], env, tmp_path / "serve.log", healthy,
                          during=lambda: assert_serving(url, checks[-1]))
    assert "Using worker: backend.http.gunicorn.GuardedThreadWorker" in log
    assert log.count("Booting worker") == 1  # one process holds the model


@pytest.mark.redis  # a real Redis on 127.0.0.1:6379
def test_the_images_worker_command_starts_an_rq_worker(compose, checkpoint, tmp_path):
    from rq import Worker

    redis = Redis.from_url(REDIS_URL)
    redis.ping()
    queue = f"deploy-{os.getpid()}"
    env = service_env(compose, "worker", SAM3_MODEL=checkpoint, DEVICE="cpu", REDIS_URL=REDIS_URL, SAM3_QUEUE=queue,
                      LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}", LABEL_STUDIO_API_KEY="x" * 40)
    log = run_until_ready(compose["services"]["worker"]["command"], env, tmp_path / "worker.log",
                          lambda: any(queue in w.queue_names() for w in Worker.all(connection=redis)))
    assert "loaded" in log  # the model loaded before the worker took jobs


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["worker"], ["label", "--project", "1"]])
@pytest.mark.parametrize("env, words", [
    ({"LABEL_STUDIO_API_KEY": "k" * 40}, "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY go together"),
    ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS go together"),
    ({"BASIC_AUTH_PASS": "p"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS go together"),
])
def test_commands_refuse_a_configuration_that_leaks_or_skips_auth(checkpoint, command, env, words):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    run = subprocess.run([EXE, *command], env={**base, "SAM3_MODEL": checkpoint, "REDIS_URL": REDIS_URL, **env},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"configuration error: {words}" in run.stderr, run.stderr[-2000:]


def _answers(url) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_the_worker_refuses_to_start_without_redis_or_label_studio(checkpoint):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL")}
    run = subprocess.run([EXE, "worker"], env={**env, "SAM3_MODEL": checkpoint}, capture_output=True, text=True)
    assert run.returncode == 2 and "REDIS_URL" in run.stderr
    run = subprocess.run([EXE, "worker"], env={**env, "SAM3_MODEL": checkpoint, "REDIS_URL": REDIS_URL},
                         capture_output=True, text=True)
    assert run.returncode == 2 and "LABEL_STUDIO_URL" in run.stderr


def test_serving_options_suit_one_gpu():
    args = cli.build_parser().parse_args(["serve"])
    opts = gunicorn.gunicorn_options(args, Settings())
    assert opts["workers"] == 1 and opts["preload_app"] is False  # one process; CUDA never forked
    assert opts["worker_class"] == "backend.http.gunicorn.GuardedThreadWorker" and opts["threads"] >= 32
    assert opts["control_socket_disable"] is True
    assert opts["timeout"] >= 600 and opts["graceful_timeout"] >= 60


def readme_configs() -> list[str]:
    """The label configs the README and the docs show people."""
    text = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return re.findall(r"```xml\n(.*?)```", text, re.S)


def test_readme_label_configs_are_valid_for_the_backend(checkpoint):
    configs = readme_configs()
    assert len(configs) >= 3
    settings = Settings(model=checkpoint, device="cpu")
    sam3 = Sam3Model(settings)
    for xml in configs:
        config = LabelConfig.parse(xml)  # the code that serves them
        assert config.outputs and config.labels
        backend = SAM3Backend(label_config=xml, settings=settings, sam3=sam3)
        assert backend.project.ontology


# ---- start-up failures are loud -------------------------------------------------------------------
@pytest.mark.redis  # a real Redis on 127.0.0.1:6379
def test_a_cuda_device_on_a_machine_without_one_fails_health_with_the_fix(checkpoint):
    """Not "loading" forever: the reason is in /health and the worker exits saying it."""
    import torch

    from backend.http.app import create_app

    assert not torch.cuda.is_available()  # CI's machine; the point is a machine like it
    app = create_app(Settings(model=checkpoint, device="cuda"))
    client = app.test_client()
    deadline = time.time() + 60
    while client.get("/health").get_json()["model_state"] == "loading" and time.time() < deadline:
        time.sleep(0.2)
    body = client.get("/health")
    assert body.status_code == 503 and body.get_json()["model_state"] == "failed"
    assert "DEVICE=cuda, but CUDA is not available" in body.get_json()["error"]
    assert "DEVICE=auto or DEVICE=cpu" in body.get_json()["error"]
    env = {**os.environ, "SAM3_MODEL": checkpoint, "DEVICE": "cuda", "REDIS_URL": REDIS_URL,
           "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "x" * 40}
    run = subprocess.run([EXE, "worker"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "CUDA is not available" in run.stderr, run.stderr[-2000:]
    bad = subprocess.run([EXE, "worker"], env={**env, "DEVICE": "gpu"}, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "configuration error: DEVICE=gpu is not a device" in bad.stderr


def test_failures_are_logged_once_with_the_reason_not_once_per_retry(checkpoint, caplog, monkeypatch):
    import logging

    from backend.sam3.model import Sam3Model

    monkeypatch.setattr(Sam3Model, "RETRY", (0.05, 0.1))
    sam3 = Sam3Model(Settings(model=checkpoint, device="cuda"))
    with caplog.at_level(logging.INFO, logger="backend.sam3.model"):
        sam3.start_loading()
        time.sleep(1.0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "CUDA is not available" in errors[0].getMessage()
    assert sum("still fails" in r.getMessage() for r in caplog.records) >= 3  # retried, quietly


def test_a_checkpoint_the_user_cannot_read_is_permission_denied_with_the_uid(tmp_path, checkpoint):
    """Checked as an unprivileged user: root reads any file, the container's uid 1000 does not."""
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="sam3-perm-", dir="/tmp"))  # a path every user may walk
    home.chmod(0o755)
    folder = home / "sam3"
    shutil.copytree(checkpoint, folder)
    (folder / "model.safetensors").chmod(0o600)
    code = ("import sys; from backend.sam3.model import check_folder; from backend.errors import BackendError\n"
            f"try: check_folder({str(folder)!r})\nexcept BackendError as e: print(e.message); sys.exit(1)")
    argv = [sys.executable, "-c", code]
    if os.getuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    else:
        (folder / "model.safetensors").chmod(0o000)
    run = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "permission denied" in run.stdout and "model.safetensors" in run.stdout
    assert f"uid {65534 if os.getuid() == 0 else os.getuid()}" in run.stdout and "chmod -R a+rX" in run.stdout
    from backend.errors import BackendError
    from backend.sam3.model import check_folder

    (folder / "model.safetensors").unlink()
    with pytest.raises(BackendError, match="no weights in that folder"):
        check_folder(str(folder))
    with pytest.raises(BackendError, match="no such folder"):
        check_folder(str(tmp_path / "nowhere"))
    shutil.rmtree(home)


def test_checkpoints_written_here_are_readable_by_every_user(checkpoint):
    for f in Path(checkpoint).iterdir():
        assert f.stat().st_mode & 0o444 == 0o444, f
    assert Path(checkpoint).stat().st_mode & 0o555 == 0o555


@pytest.mark.redis  # a real Redis on 127.0.0.1:6379
def test_a_workers_health_says_redis_and_model(tmp_path, monkeypatch, checkpoint):
    from backend.jobs import health as dispatch
    from backend.sam3.model import Sam3Model

    path = tmp_path / "worker.json"
    sam3 = Sam3Model(Settings(model=checkpoint, device="cpu"))
    redis = Redis.from_url(REDIS_URL)
    report = dispatch.HealthReport(sam3, redis, path)
    assert dispatch.read_health(path)[0] is False  # no report: not healthy
    report.write()
    ok, why = dispatch.read_health(path)
    assert not ok and why.startswith("model loading")
    sam3.load()
    report.write()
    assert dispatch.read_health(path) == (True, "ready: connected to Redis, model loaded")
    dispatch.HealthReport(sam3, Redis(port=free_port(), socket_connect_timeout=1), path).write()
    ok, why = dispatch.read_health(path)
    assert not ok and "cannot reach Redis" in why
    report.write()
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "at": data["at"] - 3600}))
    ok, why = dispatch.read_health(path)
    assert not ok and "stuck or gone" in why


def test_health_without_a_role_is_the_workers_where_a_worker_reports(tmp_path, monkeypatch, checkpoint):
    """The image has one HEALTHCHECK for both commands: in a worker's container it reads the worker's report."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PORT": str(free_port())}
    run = subprocess.run([EXE, "health"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "unhealthy" in run.stderr  # no worker here: the service, which is not running
    (tmp_path / "label-studio-sam3-worker.json").write_text(json.dumps(
        {"pid": 1, "at": time.time(), "model_state": "ready", "model_error": None, "redis": "ok"}))
    run = subprocess.run([EXE, "health"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "ready: connected to Redis, model loaded" in run.stdout
