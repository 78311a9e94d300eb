"""``/health`` (public) and ``/v1/models`` (the ids clients may use)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from toile.serve import schemas
from toile.serve.jobs import JobService
from toile.serve.routes.deps import jobs

router = APIRouter(tags=["server"])
Service = Annotated[JobService, Depends(jobs)]


@router.get("/health", response_model=schemas.Health)
def health(service: Service) -> schemas.Health:
    """ok (the worker is alive) and the queue length. Needs no token."""
    return service.health()


@router.get("/v1/models", response_model=schemas.ModelList)
def models(service: Service) -> schemas.ModelList:
    """Registered model ids and configured LoRA ids: the only names a job may use."""
    return service.models()
