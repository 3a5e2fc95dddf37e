"""Errors piperc reports to users: each names what went wrong and where."""

from __future__ import annotations


class PipercError(Exception):
    """Base class of every error piperc raises on purpose."""


class CaptureError(PipercError):
    """The model or its example inputs cannot be captured into IR."""


class StrategyError(PipercError):
    """A strategy directive cannot be applied to this model or mesh."""


class PassError(PipercError):
    """A pass failed or produced IR that does not verify."""
