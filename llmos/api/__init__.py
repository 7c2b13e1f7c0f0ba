"""The REST API: a FastAPI app over the SDK, authenticated by API keys, with per-tenant quotas.

A thin layer: it authenticates, calls the same functions the SDK calls, and maps LLMOSError
subclasses to 4xx in one error shape. It holds no job state: any API process answers for any job.
"""

from llmos.api.app import create_app

__all__ = ["create_app"]
