"""Decoding with a built model: the per-model cache, the batched decoder, generation."""
