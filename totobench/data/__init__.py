"""Dataset readers in the real on-disk formats and the embedded data world generator."""
