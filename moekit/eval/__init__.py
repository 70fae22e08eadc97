"""Evaluation on the inference engine (``moekit eval``): scoring (:mod:`moekit.eval.score`), held-out data
and tasks, metrics with standard errors, perturbations, efficiency and routing analysis, and the
side-by-side report."""
