"""One-pass multi-layer feature extraction, pooling and the on-disk feature cache."""
