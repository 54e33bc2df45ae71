"""Annotation: spaCy tags, SentencePiece pieces, alignment, vocabularies and the corpus runners (no jax/flax/tensorflow)."""
