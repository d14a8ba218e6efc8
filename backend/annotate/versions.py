"""The model_version format, in one place: "<checkpoint>-<weights hash>" (the checkpoint's own, from
`sam3.model`), then "-<hash of the ontology, thresholds and outputs>" for a project."""
from __future__ import annotations


def project_version(base: str, digest: str) -> str:
    return f"{base}-{digest}"


def made_with(version: str, base: str) -> bool:
    """Was a prediction of `version` made with the checkpoint whose own version is `base` (any project)?"""
    return version == base or version.startswith(base + "-")
