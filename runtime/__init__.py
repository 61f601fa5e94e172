"""fewstep: a fast few-step inference runtime for Stable-Diffusion-family models.

The lean runtime lives here: it needs numpy, tokenizers, safetensors and one
backend library, never torch (unless the torch backend is chosen).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Limits", "Pipeline", "PipelineOutput", "__version__", "default_model"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import fewstep` (e.g. for the CLI) stays cheap.
    if name in ("Pipeline", "PipelineOutput"):
        from fewstep import pipeline

        return getattr(pipeline, name)
    if name == "Limits":
        from fewstep.inputs import Limits

        return Limits
    if name == "default_model":
        from fewstep.package import default_model

        return default_model
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
