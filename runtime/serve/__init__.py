"""`fewstep serve`: an HTTP service over fewstep pipelines, with dynamic batching.

Built on Starlette and uvicorn (the `serve` extra) rather than a larger framework: the lean
runtime stays lean, with small dependencies and no pydantic; requests are checked by
fewstep's own argument checks, so errors name the field as the Python API's do.

- app.py: the routes, start-up, shutdown with draining, `create_app` and `run`;
- service.py: one `Batcher` per model and the path of a generation request (429/503/504);
- openai_api.py: OpenAI's Images API; errors.py: OpenAI's error shape;
- a1111_api.py: A1111's txt2img, samplers and sd-models; pngs.py: PNGs with infotexts;
- openapi.py: the OpenAPI 3.1 document at `GET /openapi.json`;
- metrics.py: Prometheus metrics;
- page.py: the web page at `GET /` (index.html: plain HTML and JavaScript);
- ray_app.py, ray_loras.py: the same app on Ray Serve replicas, with LoRA variants (the ray
  extra).

Limits: no streaming, no image URLs, no image edits or variations; one batcher per model in
each process (or Ray replica); the key is a single shared bearer token.
"""

from fewstep.serve.app import create_app, run
from fewstep.serve.errors import APIError
from fewstep.serve.service import MAX_BODY_BYTES

__all__ = ["MAX_BODY_BYTES", "APIError", "create_app", "run"]
