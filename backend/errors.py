"""Errors that reach the user as HTTP 4xx with a JSON message, and the one that is no error at all."""


class BackendError(Exception):
    """A problem with the request or its inputs; `status` is the HTTP status to answer with."""

    status = 400
    extra: dict = {}  # more fields for the JSON answer

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class ImageError(BackendError):
    """The task's image could not be fetched or decoded."""

    status = 422


class Skip(Exception):
    """The task needs no prediction (annotated, or already predicted by this model_version)."""
