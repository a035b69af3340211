"""vidanon: secure, reversible face anonymization in video with keyed diffusion."""

__version__ = "0.1.0"
