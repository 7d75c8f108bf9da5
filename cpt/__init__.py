"""cpt: continual pre-training of language models."""

__version__ = "0.1.0"
