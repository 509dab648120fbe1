"""Data: corpus sources and mixing, token shards and batches, task datasets, the synthetic demo world."""
