"""`label-studio-sam3` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _serve(args) -> int:
    from gunicorn.app.base import BaseApplication

    from .config import Settings

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class App(BaseApplication):
        def load_config(self):
            # One process holds the model (GPU memory is not shared across forks); request threads share it.
            # The app, and with it CUDA, is created in the worker after the fork (no preload).
            options = {
                "bind": f"{args.host}:{args.port}",
                "workers": 1,
                "worker_class": "gthread",
                "threads": args.threads,
                "timeout": args.timeout,  # a large batch predict can take minutes on CPU
                "graceful_timeout": args.graceful_timeout,  # finish the request in hand on SIGTERM
                "keepalive": 5,
                "preload_app": False,
                "accesslog": "-" if args.access_log else None,
                "errorlog": "-",
                "loglevel": settings.log_level.lower(),
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            from .protocol import create_app

            return create_app(settings)

    App().run()
    return 0


def _predict(args) -> int:
    """The batch pipeline on local files: Label Studio JSON and a preview PNG per image."""
    import json
    from collections import Counter
    from pathlib import Path

    from .config import Settings
    from .errors import BackendError
    from .model import Runtime, SAM3Backend
    from .preview import draw

    settings = Settings.from_env()
    if args.model:
        settings.model = args.model
    if args.device:
        settings.device = args.device
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    ontology = {}
    for spec in args.prompt:
        prompt, _, label = spec.partition("=")
        ontology[prompt.strip()] = (label or prompt).strip()
    if args.config:
        xml = Path(args.config).read_text()
    else:
        labels = "".join(f'<Label value="{label}"/>' for label in dict.fromkeys(ontology.values()))
        tag = {"polygon": "PolygonLabels", "brush": "BrushLabels", "box": "RectangleLabels"}[args.output]
        xml = f'<View><Image name="image" value="$image"/><{tag} name="label" toName="image">{labels}</{tag}></View>'
    thresholds = {"confidence": args.threshold} if args.threshold is not None else None
    try:
        runtime = Runtime(settings).load()
        engine = runtime.wait(0)
        model = SAM3Backend(label_config=xml, extra_params={"ontology": ontology or None, "thresholds": thresholds},
                            settings=settings, runtime=runtime)
    except BackendError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2

    def load_file(task):  # local files here; the HTTP service never reads the local disk
        path = Path(task["data"]["image"])
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read {path}: {e.strerror}") from None
        return model.loader.decode(data, name=str(path))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [{"id": i, "data": {"image": str(Path(p).resolve())}} for i, p in enumerate(args.images, 1)]
    for task, image, prediction in model.iter_predictions(tasks, load=load_file):
        path = Path(task["data"]["image"])
        (out / f"{path.stem}.json").write_text(json.dumps({"data": task["data"], "predictions": [prediction]}, indent=1))
        if image is None:
            print(f"{path}: not an image it could read (see the log); empty prediction written", file=sys.stderr)
            continue
        draw(image, prediction["result"]).save(out / f"{path.stem}.png")
        counts = Counter(r["value"][r["type"]][0] for r in prediction["result"])
        print(f"{path.name}: {len(prediction['result'])} regions {dict(counts) or ''} -> {out / path.stem}.json/.png")
    print(f"model_version {model.model_version}; {engine.vit_passes} ViT passes for {len(tasks)} images")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="label-studio-sam3", description="SAM 3 ML backend for Label Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the ML backend HTTP service (gunicorn)")
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    serve.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "8")))
    serve.add_argument("--timeout", type=int, default=int(os.environ.get("GUNICORN_TIMEOUT", "600")))
    serve.add_argument("--graceful-timeout", type=int, default=120)
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_serve)
    pred = sub.add_parser("predict", help="pre-annotate local images: Label Studio JSON + preview PNG per image")
    pred.add_argument("images", nargs="+")
    pred.add_argument("--prompt", action="append", default=[], metavar="PROMPT[=LABEL]",
                      help='text prompt and the label it gives, e.g. "red car=car" (repeatable)')
    pred.add_argument("--out", required=True, help="output folder")
    pred.add_argument("--config", help="a Label Studio label config file (default: one PolygonLabels of the labels)")
    pred.add_argument("--output", choices=["polygon", "brush", "box"], default="polygon")
    pred.add_argument("--threshold", type=float, help="minimum score (default SAM3_TEXT_THRESHOLD, 0.5)")
    pred.add_argument("--model", help="checkpoint (default SAM3_MODEL)")
    pred.add_argument("--device")
    pred.set_defaults(func=_predict)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
