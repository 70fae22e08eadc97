"""The OpenAI-compatible HTTP server (``moekit serve``; the ``serve`` extra: FastAPI, uvicorn,
prometheus-client). :func:`create_app` builds the ASGI app around an :class:`~moekit.infer.Engine`."""

from moekit.serve.app import create_app

__all__ = ["create_app"]
