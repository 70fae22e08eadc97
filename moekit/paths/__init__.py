"""Task paths through an MoE (``moekit paths``, ``moekit extract``; docs/pathways.md): which experts serve
each task, how much of the network a task really uses, and a smaller checkpoint holding one task's experts.

:mod:`moekit.paths.coverage` (pure math), :mod:`moekit.paths.trace` (routing each task's text through the
engine), :mod:`moekit.paths.report` (paths.md, paths.json, heatmaps), :mod:`moekit.paths.extract` (the cut).
Sits on the engine (:mod:`moekit.infer`), the routing views (:mod:`moekit.eval.routing`) and the checkpoint
layer; nothing below imports it.
"""
