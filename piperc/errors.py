"""Errors piperc reports to users: each names what went wrong and where."""

from __future__ import annotations

import os
import traceback


class PipercError(Exception):
    """Base class of every error piperc raises on purpose."""


class CaptureError(PipercError):
    """The model or its example inputs cannot be captured into IR."""


class StrategyError(PipercError):
    """A strategy directive cannot be applied to this model or mesh."""


class PassError(PipercError):
    """A pass failed or produced IR that does not verify."""


def describe(error: BaseException) -> str:
    """`Type: first line of the message`, then where it was raised in the user's code
    (`user_frame`)."""
    message = first_line(error) if str(error).strip() else "(no message)"
    return f"{type(error).__name__}: {message}{user_frame(error)}"


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def user_frame(error: BaseException) -> str:
    """Where `error` was raised in the user's code: the innermost frame of its traceback
    outside torch, piperc's driver and the import machinery, as
    `\n  at FILE:LINE in FUNCTION: CODE` (nothing when every frame is theirs)."""
    import torch  # here, not at the top: the CLIs import this module and answer --help without torch

    skipped = (os.path.dirname(torch.__file__), os.path.dirname(__file__), "<frozen ")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(skipped)]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
