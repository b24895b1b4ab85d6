"""Helpers for tests: generated GGUF models and a trained code vocabulary."""
