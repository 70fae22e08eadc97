"""Evaluation: `moekit eval` (scores, tasks, metrics, report), efficiency and routing analysis."""
