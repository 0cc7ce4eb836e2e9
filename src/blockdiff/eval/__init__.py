"""Evaluation of decoders on held-out prompts."""
