"""The OpenAI-compatible HTTP server, a layer above the engine (`nox -s serve`).

Modules: async_engine (the engine on a thread of its own, requests streamed to asyncio),
protocol (the request schemas and the OpenAI-style error body), metrics (Prometheus),
app (the FastAPI routes), main (the command line), static/ (the chat page).

Unlike the model and the engine, this layer uses the ecosystem's pieces (FastAPI, uvicorn,
pydantic, prometheus_client: the `serve` dependency group); impl.engine never imports it.
"""
