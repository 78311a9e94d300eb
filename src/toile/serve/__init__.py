"""``toile serve``: an HTTP server over the engine, with a durable job queue: SQLite in one
process (the default), or PostgreSQL shared by API processes and ``toile worker``s.

Layout (each module small, and importing any of them does no work):

- ``config``   the typed server configuration (TOML/JSON file + flags + environment)
- ``queue``    the :class:`~toile.serve.queue.JobQueue` interface (claims, leases, fairness)
- ``sqlqueue`` the queue's SQL, shared by both databases; ``rows`` what queues return
- ``store``    the embedded queue: SQLite in WAL mode, ``synchronous=FULL``
- ``queue_pg``, ``events_pg``  the shared queue and events in PostgreSQL (SKIP LOCKED claims,
               leases, LISTEN/NOTIFY)
- ``backends`` which queue, events and blob store a process opens, and their housekeeping
- ``blobs``    uploads and result images by name, in a (local or shared) folder
- ``jobs``     :class:`~toile.serve.jobs.JobService`, the internal API routes call
               (``submit``, ``get``, ``list``, ``cancel``, ``events``, ``image``)
- ``worker``   the thread that runs queued jobs through one :class:`~toile.engine.engine.Engine`
- ``events``   live job events (progress, previews) fanned out to subscribers (SSE); the
               :class:`~toile.serve.events.EventBus` interface
- ``uploads``  base64 image inputs: size, format and pixel checks before decoding
- ``schemas``  pydantic request/response bodies (the OpenAPI schema)
- ``webhooks`` at-least-once job-end callbacks, bounded timeout, never fatal
- ``auth``     bearer token, cross-origin and Host checks (pure ASGI middleware)
- ``app``      ``create_app(config) -> FastAPI``
- ``routes/``  HTTP routes; they only translate HTTP to ``JobService`` calls
- ``client``, ``process``  a small stdlib HTTP client and server/worker subprocess managers,
               used by the tests and ``python -m toile.serve.bench``
- ``bench``    throughput/latency at 1, 4, 16 clients, overhead vs the engine, cancel latency,
               kill -9 durability runs
"""
