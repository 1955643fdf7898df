"""Checkpoints: sharded saves and their commit protocol, merged files, RNG states, Hugging Face weights."""
