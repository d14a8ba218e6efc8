"""`label-studio-sam3 predict`: the batch pipeline on local files, a Label Studio task JSON (with its prediction)
and a preview PNG per file, to see what the model will do to a project before it does it."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from .. import logs
from ..annotate.labeller import Labeller
from ..annotate.preview import draw
from ..annotate.project import Project
from ..annotate.task import Outcome, Task
from ..errors import BackendError
from ..sam3.model import Sam3Model
from . import common

TAGS = {"polygon": "PolygonLabels", "brush": "BrushLabels", "box": "RectangleLabels"}


def label_config(args, ontology: dict) -> str:
    """The --config file, else one Image and one output control of the --output kind with the prompts' labels."""
    if args.config:
        return Path(args.config).read_text()
    labels = "".join(f'<Label value="{label}"/>' for label in dict.fromkeys(ontology.values()))
    tag = TAGS[args.output]
    return f'<View><Image name="image" value="$image"/><{tag} name="label" toName="image">{labels}</{tag}></View>'


class LocalFiles:
    """Tasks made of local files, read from disk (the HTTP service never reads the local disk)."""

    def __init__(self, labeller: Labeller):
        self.labeller, config = labeller, labeller.project.require_config()
        self.video = next(iter(config.videos), None)  # a video config: the files are videos
        self.key = config.videos[self.video][0] if self.video else config.value_key

    def tasks(self, paths: list[str]) -> list[Task]:
        return [Task(i, {self.key: str(Path(p).resolve())}) for i, p in enumerate(paths, 1)]

    def load(self, task: Task, name: str):
        config = self.labeller.project.require_config()
        path = Path(task.data[self.key if self.video else config.images.get(name, self.key)])
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read {path}: {e.strerror}") from None
        if self.video:
            return self.labeller.videos.open(task, self.video, data)
        return self.labeller.project.loader.decode(data, name=str(path))


def run(args) -> int:
    settings = common.settings()
    if args.model:
        settings.model = args.model
    if args.device:
        settings.device = args.device
    logs.setup(settings.log_level, timestamps=False)
    ontology = common.ontology(args.prompt) or {}
    if not ontology and not args.config:
        print("error: give at least one --prompt (e.g. --prompt cat), or a label config with --config",
              file=sys.stderr)
        return 2
    thresholds = {"confidence": args.threshold} if args.threshold is not None else None
    try:
        sam3 = Sam3Model(settings).load()
        engine = sam3.wait(0)
        project = Project(settings, sam3, label_config(args, ontology),
                          {"ontology": ontology or None, "thresholds": thresholds, "tiling": args.tiling})
        labeller = Labeller(project, engine)
        files = LocalFiles(labeller)
    except BackendError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = files.tasks(args.images)
    failed = regions = 0
    for outcome in labeller.label(tasks, files.load):
        n = write(outcome, out, files)
        failed += n is None
        regions += n or 0
    what = "videos" if files.video else "images"
    print(f"model_version {project.model_version}; {engine.vit_passes} ViT passes for {len(tasks)} {what}")
    if not regions and failed < len(tasks):
        print(f"no instance scored above {project.thresholds.confidence}: try a lower --threshold (a checkpoint with "
              "random weights, like the tiny test one, scores about 0.25)", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(tasks)} {what} could not be read", file=sys.stderr)
    return 1 if failed == len(tasks) else 0


def write(outcome: Outcome, out: Path, files: LocalFiles) -> int | None:
    """The task's JSON (and preview PNG for an image); its number of regions, or None when it failed."""
    task, prediction = outcome.task, outcome.prediction
    path = Path(task.data[files.key])
    if outcome.error is not None:
        (out / f"{path.stem}.json").write_text(json.dumps({"data": task.data, "error": str(outcome.error)}, indent=1))
        print(f"{path}: {getattr(outcome.error, 'message', outcome.error)}", file=sys.stderr)
        return None
    (out / f"{path.stem}.json").write_text(json.dumps({"data": task.data, "predictions": [prediction]}, indent=1))
    if outcome.images:  # a video has no preview picture: its JSON imports into a video project as is
        draw(next(iter(outcome.images.values())), prediction["result"]).save(out / f"{path.stem}.png")
    counts = Counter((r["value"].get(r["type"]) or r["value"]["labels"])[0] for r in prediction["result"])
    kind = "tracks" if files.video else "regions"
    print(f"{path.name}: {len(prediction['result'])} {kind} {dict(counts) or ''} -> {out / path.stem}.json"
          f"{'' if files.video else '/.png'}")
    return len(prediction["result"])
