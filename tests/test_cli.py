import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import make_image

EXE = str(Path(sys.executable).with_name("label-studio-sam3"))


def test_predict_writes_label_studio_json_and_a_preview_per_image(checkpoint, tmp_path):
    paths = []
    for i, size in enumerate([(64, 48), (80, 60)]):
        p = tmp_path / f"photo{i}.png"
        make_image(*size, seed=i).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    r = subprocess.run([EXE, "predict", *paths, "--prompt", "a small kitty=cat", "--prompt", "dog", "--out", str(out),
                        "--model", checkpoint, "--device", "cpu", "--threshold", "0"],
                       capture_output=True, text=True, timeout=300)
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


def test_predict_refuses_prompts_for_labels_missing_from_the_config(checkpoint, tmp_path):
    make_image().save(tmp_path / "a.png")
    config = tmp_path / "config.xml"
    config.write_text('<View><Image name="image" value="$image"/>'
                      '<PolygonLabels name="p" toName="image"><Label value="cat"/></PolygonLabels></View>')
    r = subprocess.run([EXE, "predict", str(tmp_path / "a.png"), "--prompt", "red car=car", "--config", str(config),
                        "--out", str(tmp_path / "out"), "--model", checkpoint, "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "['car']" in r.stderr and "valid labels: cat" in r.stderr
