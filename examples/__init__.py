"""Runnable examples: the end-to-end demo (`python -m examples.demo`) and its cached-stage runner."""
