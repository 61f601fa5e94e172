"""fewstep.kernels: Triton kernels with torch references (needs torch + triton).

- `group_norm` / `group_norm_ref`: fused GroupNorm (+ SiLU), NCHW and channels_last.
- `attention` / `attention_ref`: flash-style attention forward, SDPA layout.
- `geglu` / `geglu_ref`: h · gelu(g) over a projection's two halves, in one pass.
- `layer_norm` / `layer_norm_ref`: LayerNorm over the last dim, whole rows per program.
- `group_norm_op` / `attention_op` / `geglu_op` / `layer_norm_op`: the same as torch
  custom ops (`torch.ops.fewstep.group_norm`, `.attention`, `.geglu`, `.layer_norm`) that
  fall back to torch for unsupported inputs or when FEWSTEP_DISABLE_KERNELS=1; this is
  what models call.
- `patch` / `unpatch`: swap the ops into a diffusers U-Net or VAE, in place
  (GroupNorm → SiLU pairs, other GroupNorms, attention processors, GEGLUs, LayerNorms,
  upsamplers, 1×1 convolutions); `KERNEL_NAMES`: the kernels it can swap in, by name.
- `tuning`: with `tune=True`, each op keeps per shape the faster of its kernel and torch's
  own, timed on the GPU at its first call.

On machines without a CUDA GPU the kernels run in Triton's interpreter when
TRITON_INTERPRET=1 is set before this package is imported.
"""

import importlib as _importlib
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys


def _step_aside() -> None:
    """This folder imported as a top-level `kernels`: the repository root is on sys.path
    (`python -m …` run from it), where the name belongs to the unrelated Hugging Face `kernels`
    package, which transformers probes for and imports from. Hand over that package when it
    is installed, else fewstep.kernels itself (a second copy of this one would register the
    torch custom ops again and replace fewstep's)."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != root]
    spec = _machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None or spec.loader is None:
        _sys.modules[__name__] = _importlib.import_module("fewstep.kernels")
        return
    module = _util.module_from_spec(spec)
    _sys.modules[__name__] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _step_aside()
else:
    from .attention import attention, attention_ref
    from .geglu import geglu, geglu_ref
    from .group_norm import group_norm, group_norm_ref
    from .layer_norm import layer_norm, layer_norm_ref
    from .ops import (
        attention_fallback_reason,
        attention_op,
        geglu_fallback_reason,
        geglu_op,
        group_norm_fallback_reason,
        group_norm_op,
        layer_norm_fallback_reason,
        layer_norm_op,
    )
    from .patch import (
        KERNEL_NAMES,
        FewstepAttnProcessor,
        PatchReport,
        is_patched,
        patch,
        unpatch,
    )

__all__ = [
    "KERNEL_NAMES",
    "FewstepAttnProcessor",
    "PatchReport",
    "attention",
    "attention_fallback_reason",
    "attention_op",
    "attention_ref",
    "geglu",
    "geglu_fallback_reason",
    "geglu_op",
    "geglu_ref",
    "group_norm",
    "group_norm_fallback_reason",
    "group_norm_op",
    "group_norm_ref",
    "is_patched",
    "layer_norm",
    "layer_norm_fallback_reason",
    "layer_norm_op",
    "layer_norm_ref",
    "patch",
    "unpatch",
]
