import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import make_image
from PIL import Image

from backend import cli

EXE = str(Path(sys.executable).with_name("label-studio-sam3"))


def main(capsys, monkeypatch, *argv, env=None):
    """The command line in this process (as `label-studio-sam3 ARGV` runs it, without a torch import per test);
    its exit code, stdout and stderr. `test_a_busy_port...` runs the installed console script itself."""
    for key in [k for k in os.environ if k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "REDIS_URL"))]:
        monkeypatch.delenv(key)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_predict_writes_label_studio_json_and_a_preview_per_image(checkpoint, tmp_path, capsys, monkeypatch):
    paths = []
    for i, size in enumerate([(64, 48), (80, 60)]):
        p = tmp_path / f"photo{i}.png"
        make_image(*size, seed=i).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    r = main(capsys, monkeypatch, "predict", *paths, "--prompt", "a small kitty=cat", "--prompt", "dog", "--out",
             str(out), "--model", checkpoint, "--device", "cpu", "--threshold", "0")
    assert r.returncode == 0, r.stderr
    for i, size in enumerate([(64, 48), (80, 60)]):
        doc = json.loads((out / f"photo{i}.json").read_text())
        assert doc["data"]["image"] == paths[i]
        [pred] = doc["predictions"]
        assert pred["result"] and pred["model_version"].startswith("sam3-tiny")
        assert {reg["value"]["polygonlabels"][0] for reg in pred["result"]} <= {"cat", "dog"}
        assert all(reg["original_width"] == size[0] for reg in pred["result"])
        preview = Image.open(out / f"photo{i}.png")
        assert preview.size == size
        assert preview.tobytes() != make_image(*size, seed=i).tobytes()  # something was drawn
    assert "ViT passes for 2 images" in r.stdout


def test_predict_refuses_prompts_for_labels_missing_from_the_config(checkpoint, tmp_path, capsys, monkeypatch):
    make_image().save(tmp_path / "a.png")
    config = tmp_path / "config.xml"
    config.write_text('<View><Image name="image" value="$image"/>'
                      '<PolygonLabels name="p" toName="image"><Label value="cat"/></PolygonLabels></View>')
    r = main(capsys, monkeypatch, "predict", str(tmp_path / "a.png"), "--prompt", "red car=car", "--config",
             str(config), "--out", str(tmp_path / "out"), "--model", checkpoint, "--device", "cpu")
    assert r.returncode == 2
    assert "['car']" in r.stderr and "valid labels: cat" in r.stderr


def run(*argv, env=None, timeout=300):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "REDIS_URL"))}
    return subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})})


def test_predict_says_what_is_missing_and_fails_when_nothing_could_be_read(checkpoint, tmp_path, capsys, monkeypatch):
    def run(*argv):
        return main(capsys, monkeypatch, *argv)

    make_image().save(tmp_path / "a.png")
    r = run("predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--model", checkpoint)
    assert r.returncode == 2 and "give at least one --prompt" in r.stderr
    (tmp_path / "broken.png").write_bytes(b"not a png")
    r = run("predict", str(tmp_path / "broken.png"), str(tmp_path / "missing.png"), "--prompt", "cat", "--out",
            str(tmp_path / "out"), "--model", checkpoint, "--device", "cpu")
    assert r.returncode == 1, r.stderr
    assert "not a readable image" in r.stderr and "cannot read" in r.stderr and "2 of 2 images" in r.stderr
    assert "error" in json.loads((tmp_path / "out" / "broken.json").read_text())
    r = run("predict", str(tmp_path / "a.png"), "--prompt", "cat", "--out", str(tmp_path / "out"), "--model",
            checkpoint, "--device", "cpu")
    assert r.returncode == 0 and "0 regions" in r.stdout
    assert "try a lower --threshold" in r.stderr  # the tiny model scores ~0.25, under the default 0.5


def test_a_busy_port_and_an_unreachable_redis_are_one_clear_line(checkpoint):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", "--host", "127.0.0.1", "--port", str(port), env={"SAM3_MODEL": checkpoint}, timeout=60)
    assert r.returncode == 2 and "Address already in use" in r.stderr and "--port N" in r.stderr
    down = {"REDIS_URL": "redis://127.0.0.1:1/0", "SAM3_MODEL": checkpoint}
    for argv in (["jobs"], ["worker"], ["label", "--project", "1"]):
        r = run(*argv, env={**down, "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k"},
                timeout=60)
        assert r.returncode == 2 and "Redis at REDIS_URL=redis://127.0.0.1:1/0 is not answering" in r.stderr
        assert "Traceback" not in r.stderr and "loaded" not in r.stderr  # checked before the model loads
