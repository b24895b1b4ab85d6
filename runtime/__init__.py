"""llmctl's inference runtime: StarCoder / StarCoder2 GGUF models on CPUs, matching llama.cpp.

from runtime import Model
m = Model.load("model.gguf")
print("".join(m.generate("def fib(n):", max_tokens=32)))
"""

from runtime.engine import Completion, Model
from runtime.errors import ModelError

__all__ = ["Completion", "Model", "ModelError"]
