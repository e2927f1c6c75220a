"""Run configuration: the validation schema, the run config's sections, recipe policy, preflight."""
