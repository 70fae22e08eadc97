"""Errors shared by the checkpoint layer and the converters, below both so imports point one way.

``moekit.checkpoint`` (save/load for every format) dispatches to ``moekit.convert``; both raise
:class:`CheckpointError`, so it lives here rather than in either of them.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""
