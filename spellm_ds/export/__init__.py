"""Export directories: their format, and writing one from a training checkpoint."""
