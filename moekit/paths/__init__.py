"""Task paths through an MoE (``moekit paths``, ``moekit extract``; docs/pathways.md): which experts serve
each task, how much of the network a task really uses, and a smaller checkpoint holding one task's experts.

Sits on the engine (:mod:`moekit.infer`), the routing views (:mod:`moekit.eval.routing`) and the checkpoint
layer; nothing below imports it.
"""

from moekit.paths.extract import Extraction, extract
from moekit.paths.report import write_paths
from moekit.paths.trace import trace_paths

__all__ = ["Extraction", "extract", "trace_paths", "write_paths"]
