"""Side-by-side measurements of llmctl's runtime against llama.cpp and others."""
