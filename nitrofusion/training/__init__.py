"""Training loops and their plumbing (checkpoints, EMA)."""
