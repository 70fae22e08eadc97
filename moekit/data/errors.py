"""The one error type of the data layer, so callers (the CLI) can print it as a single clean line."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or tokenizer: the message names the file (and where in it) and what to do."""
