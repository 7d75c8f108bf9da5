"""Data: reading corpora, tokenizers, token shards and the loaders that feed training and evaluation."""
