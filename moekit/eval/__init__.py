"""Evaluation on the inference engine: scoring (:mod:`moekit.eval.score`), held-out data and tasks,
metrics with standard errors, perturbations, and the side-by-side report of ``moekit eval``."""
