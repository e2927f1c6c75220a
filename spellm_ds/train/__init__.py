"""Training: setup, loop, schedule, signals, callbacks, checkpoints, reports, warm start, losses."""
