"""fewstep: a fast few-step inference runtime for Stable-Diffusion-family models.

The lean runtime lives here: it needs numpy, tokenizers, safetensors and one
backend library, never torch (unless the torch backend is chosen).
"""

__version__ = "0.1.0"
