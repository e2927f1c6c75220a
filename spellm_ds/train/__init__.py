"""Training: the loop and its step, schedule, checkpoints, run reports, warm start and losses."""
