"""OpenAI-compatible server over `bitllm.LLM`: continuous batching, streaming, a chat page.

    bitllm serve MODEL --port 8000 --api-key KEY

User guide: docs/serve.md.
"""

from __future__ import annotations

from bitllm.serve.app import ServeConfig, create_app
from bitllm.serve.server import Server, serve

__all__ = ["ServeConfig", "Server", "create_app", "serve"]
