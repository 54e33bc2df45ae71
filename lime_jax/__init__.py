"""lime_jax: language models with linguistic metadata embeddings (LIME) in JAX/Flax."""

__version__ = "0.1.0"
