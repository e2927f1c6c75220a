"""Run configuration: validation schema, the run config, recipe policy, preflight, DeepSpeed fill."""
