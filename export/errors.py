"""Typed export errors: ``fashion`` prints their message as one line and exits 2 (see ``fashion.cli``)."""

from __future__ import annotations

from fashion.errors import UserError


class ExportError(UserError, RuntimeError):
    """The export cannot go on; the message says what to do."""


class ParityError(ExportError):
    """The exported graph does not compute what PyTorch computes, beyond the stated tolerance."""


class PrecisionError(ExportError):
    """A reduced-precision variant agrees with FP32 less than the threshold (``--force`` writes it anyway)."""


class TensorRTUnavailable(ExportError):
    """TensorRT or a GPU is missing here; the message says where a plan can be built."""
