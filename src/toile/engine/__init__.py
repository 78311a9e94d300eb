"""Requests -> family pipelines: model registry and cache, progress, cancellation, records."""
