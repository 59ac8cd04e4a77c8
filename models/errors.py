"""Errors a user can act on."""

from __future__ import annotations

from pathlib import Path


class WeightsNotFoundError(FileNotFoundError):
    """A model's weights file is missing. The message names the file and how to get it."""

    def __init__(self, model: str, path: Path | str, how_to_get: str) -> None:
        self.model = model
        self.path = Path(path)
        self.how_to_get = how_to_get
        super().__init__(f"{model}: weights file not found: {self.path}. {how_to_get}")


class ModelInputError(ValueError):
    """An image or box a model cannot work on (wrong shape, dtype, empty box)."""
