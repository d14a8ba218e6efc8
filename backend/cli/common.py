"""What every command shares: settings checked at start (exit 2 naming each problem), and the prompt flags."""
from __future__ import annotations

import sys

from ..config import Settings
from ..http.startup import problems


def settings(bulk: bool = False) -> Settings:
    """Settings from the environment; a configuration that cannot work stops the command (exit 2).
    `bulk`: no click waits on this process (see `Settings.from_env`)."""
    s = Settings.from_env(bulk=bulk)
    found = problems(s)
    if found:
        for problem in found:
            print(f"configuration error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return s


def ontology(specs: list[str]) -> dict | None:
    """--prompt PROMPT[=LABEL] flags as a {prompt: label} ontology (None for none)."""
    out = {}
    for spec in specs:
        prompt, _, label = spec.partition("=")
        out[prompt.strip()] = (label or prompt).strip()
    return out or None
