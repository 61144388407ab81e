"""The activation path, in reading order: tokens -> activations (forward + filters) -> writer / shards
(the cache on disk) -> batches (cached or live, behind one BatchSource interface)."""
