"""One logging setup for every command: level from LOG_LEVEL, one line per record."""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: str = "INFO", timestamps: bool = True) -> None:
    """Configure the root logger once (a second call changes nothing: the first command's setup wins)."""
    logging.basicConfig(level=level, format=FORMAT if timestamps else FORMAT.split(" ", 1)[1])
