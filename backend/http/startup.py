"""What stops the service (and every command) from starting: settings that cannot work, named."""
from __future__ import annotations

from ..config import Settings
from ..labelstudio.client import settings_problems


def problems(settings: Settings) -> list[str]:
    """The settings' own problems and those of the Label Studio URL and address policy they name."""
    return settings.problems() + settings_problems(settings)
