"""``toile serve``: an HTTP server over the engine, with a durable SQLite job queue.

Layout (each module small, and importing any of them does no work):

- ``config``   the typed server configuration (TOML/JSON file + flags + environment)
- ``store``    the durable queue: SQLite in WAL mode, ``synchronous=FULL``
- ``jobs``     :class:`~toile.serve.jobs.JobService`, the internal API routes call
               (``submit``, ``get``, ``list``, ``cancel``, ``events``, ``image``)
- ``worker``   the thread that runs queued jobs through one :class:`~toile.engine.engine.Engine`
- ``events``   live job events (progress, previews) fanned out to subscribers (SSE)
- ``uploads``  base64 image inputs: size, format and pixel checks before decoding
- ``schemas``  pydantic request/response bodies (the OpenAPI schema)
- ``webhooks`` at-least-once job-end callbacks, bounded timeout, never fatal
- ``auth``     bearer token, cross-origin and Host checks (pure ASGI middleware)
- ``app``      ``create_app(config) -> FastAPI``
- ``routes/``  HTTP routes; they only translate HTTP to ``JobService`` calls
- ``client``, ``process``  a small stdlib HTTP client and a server subprocess manager, used by
               the tests and ``python -m toile.serve.bench``
- ``bench``    throughput/latency at 1, 4, 16 clients, overhead vs the engine, cancel latency,
               kill -9 durability runs
"""
