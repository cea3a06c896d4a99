"""ovc_jax: Open Vocabulary Certification of CLIP zero-shot classifiers in JAX."""

__version__ = "0.1.0"
