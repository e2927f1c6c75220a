"""User-facing error types: the CLI prints these without a traceback and exits with code 2."""


class SpellmError(ValueError):
    """An error caused by user input (a file, a field, a sample), reported as one clear message."""


class ShardError(SpellmError):
    """A shard or sample is malformed; the message names the shard and the sample key."""


class EveryRankError(SpellmError):
    """A user error found by a collective check, so raised on every rank at once."""
