"""Errors raised by engine.generate; each message says what to do next."""

from __future__ import annotations


class GenerateError(Exception):
    """Base class of every engine.generate error."""


class ModelFetchError(GenerateError):
    """The model file could not be downloaded or found."""


class ModelBuildError(GenerateError):
    """The model file could not be read or converted (unsupported architecture, bad file)."""
