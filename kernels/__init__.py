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
import sys as _sys

if __name__ == "kernels":
    # This folder is `fewstep.kernels`. With the repository root on sys.path (`python -m
    # pytest` from the root), transformers' probe for the unrelated Hugging Face `kernels`
    # package imports it as a top-level `kernels`; a second copy would register the torch
    # custom ops again and replace fewstep's. Hand back the real package instead.
    _sys.modules[__name__] = _importlib.import_module("fewstep.kernels")
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
