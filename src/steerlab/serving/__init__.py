"""Serving: an OpenAI-compatible API with per-request steering, its batcher and playground.

Imported only by ``steerlab serve``; fastapi and uvicorn are the ``serve`` extra.
"""
