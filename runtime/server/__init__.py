"""The runtime's HTTP server: OpenAI- and llama.cpp-compatible completion endpoints over a
continuous-batching scheduler (`python -m runtime serve`)."""
