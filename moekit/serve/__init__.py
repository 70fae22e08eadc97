"""The OpenAI-compatible HTTP server (``moekit serve``; the ``serve`` extra: FastAPI, uvicorn,
prometheus-client). :func:`create_app` builds the ASGI app around an :class:`~moekit.infer.Engine`;
:func:`begin_shutdown` fails the requests in flight when a shutdown starts;
:func:`create_dashboard_app` serves a training run's dashboard (``moekit dashboard``)."""

from moekit.serve.app import begin_shutdown, create_app, create_dashboard_app

__all__ = ["begin_shutdown", "create_app", "create_dashboard_app"]
