"""Model merging: weight arithmetic over state dicts, the models it reads and writes, and measuring merges."""
