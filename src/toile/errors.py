"""The error types toile raises. Every message names what was wrong and what is allowed."""

from __future__ import annotations


class ToileError(Exception):
    """Base class: an error with a message meant for the user, never a crash."""


class RequestError(ToileError, ValueError):
    """A request field has an invalid value. ``field`` names it (as the API and CLI spell it)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class UnsupportedModeError(RequestError):
    """The model's family cannot run the requested mode (never a silent fallback)."""


class ModelNotFoundError(ToileError, LookupError):
    """An unknown model id or a path that does not exist."""

    @classmethod
    def missing_path(cls, target: object) -> ModelNotFoundError:
        """No such file or folder; a Hugging Face Hub id (``owner/name``) is told where models
        come from, since toile loads from disk and fetches nothing by itself."""
        import re

        text = str(target)
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and ".." not in text:
            return cls(
                f"no such file or folder: {text}; if {text!r} is a Hugging Face Hub id, note "
                "that toile loads models from disk only: install it first with `toile models "
                f"pull {text}` (verified hashes, registered), then use its id"
            )
        return cls(f"no such file or folder: {text}")


class ModelFormatError(ToileError):
    """A checkpoint whose layout toile cannot identify, or that is malformed or incomplete."""


class UnsafeFileError(ToileError):
    """A pickle-based weight file (.ckpt/.pt/.pth/.bin): refused because loading runs code."""


class ImageInputError(RequestError):
    """An input image or mask that cannot be used (not an image, truncated, too large...)."""


class CancelledError(ToileError):
    """A running generation was cancelled; raised from inside the denoising loop."""


class NumericalError(ToileError):
    """The denoising state became NaN/inf (half-precision overflow, a broken checkpoint...).

    Raised at the step where it happens, instead of saving a black image as if it succeeded.
    """


def one_line(text: object, limit: int = 300) -> str:
    """``text`` (often a library's exception) as one line of at most ``limit`` characters, for
    messages that quote it: the CLI promises one-line errors, and a parser's message may carry
    newlines or echo megabytes of the input it choked on."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
