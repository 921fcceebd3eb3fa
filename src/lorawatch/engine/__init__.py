"""Measuring a checkpoint: generation, pooled decoding, forward passes, reference drift, the base cache."""
