"""Teacher shard building: corpus reading, packing, teacher forward, top-k, shard writing."""
