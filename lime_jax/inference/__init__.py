"""Inference: loading a model dir, decoding and generation with metadata guidance."""
