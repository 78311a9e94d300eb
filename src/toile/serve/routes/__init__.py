"""HTTP routes. Each module is an ``APIRouter`` that only translates HTTP to ``JobService``
calls; the service (``request.app.state.jobs``) owns every decision."""
