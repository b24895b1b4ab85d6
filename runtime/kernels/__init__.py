"""Compiled hot loops (C with AVX2 behind run-time CPU dispatch, wrapped by Cython)."""
