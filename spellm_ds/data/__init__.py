"""Teacher shards: their format, building, validation, and streaming them exactly once per epoch."""
