"""Inference: KV-cache formats and decoding (see README)."""
