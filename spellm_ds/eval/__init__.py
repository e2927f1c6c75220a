"""Evaluation: fidelity metrics, the eval report, teacher/student comparison, lm-eval."""
