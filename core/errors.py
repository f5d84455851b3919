"""Errors with a stable machine-readable code, turned into MQTT error payloads and rejected/ reasons."""

from __future__ import annotations


class AnomalyError(Exception):
    """Base error: `code` is part of the public contract (snake_case), `message` is for humans."""

    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InputError(AnomalyError):
    """The input (image bytes, metadata, ids) cannot be used; the request is rejected."""

    code = "invalid_input"


class ModelNotReadyError(AnomalyError):
    """Prediction asked of a ROI that has no fitted memory bank yet."""

    code = "model_not_fitted"


class WeightsNotFoundError(AnomalyError):
    """Backbone weights are missing; the message says which files and where to put them."""

    code = "weights_not_found"


class BackboneMismatchError(AnomalyError):
    """A memory bank was built with other features than the running backbone produces."""

    code = "backbone_mismatch"


class StorageError(AnomalyError):
    """The data root could not be written (disk full: code disk_full); nothing stored was damaged."""

    code = "storage_error"
