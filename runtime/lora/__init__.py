"""fewstep.lora: LoRA files folded into a model's weights (docs/reference.md#lora-files).

    W ← W + Σ_i scale_i · (alpha_i / rank_i) · up_i @ down_i

Reading (`files.py`): kohya/A1111 and diffusers/PEFT safetensors → checked `LoraFile`s.
Resolving and folding (`fold.py`): keys → base weight names of the diffusers modules, shape
checks, the fold in float32; kohya's SDXL U-Net names (Stability's sgm layout,
`input_blocks_4_1_…`) are translated with the U-Net's config (`sgm_names.py`). Components:
`unet`, `text_encoder` and, for SDXL, `text_encoder_2`. Targets:

- ONNX packages, without re-export (`onnx_package.py`, with `fewstep.onnx_proto`): new initializer
  values for onnxruntime sessions (`Pipeline.from_pretrained(package, loras=…)`), or a new
  package with the weights rewritten (`apply_loras_to_package`, `fewstep lora apply`).
- torch modules in place (`torch_fold.py`): `fold_lora_torch` / `unfold_lora_torch`.
- at export: `export_package(..., loras=…)` folds into the torch modules before tracing.

Unfolding is exact everywhere because nothing is ever subtracted: ONNX targets start from the
package's files, torch targets from pristine copies. Every error (missing or unknown file,
keys that match no weight, shape mismatches, non-finite values or scales, non-float tensors,
rank 0, a folded weight that overflows the target's dtype) is a ValueError raised before
anything changes.

Needs numpy and safetensors only (torch for the torch target, imported there).
"""

from fewstep.lora.files import (
    LoraArg,
    LoraFile,
    LoraLayer,
    describe_loras,
    load_loras,
    parse_lora_arg,
    read_lora,
)
from fewstep.lora.fold import WeightFold, canonical_weight_name, fold_array, plan_fold
from fewstep.lora.onnx_package import (
    LORA_GRAPHS,
    LORA_MAP_NAME,
    apply_loras_to_package,
    lora_initializers,
)
from fewstep.lora.torch_fold import fold_lora_torch, unfold_lora_torch

__all__ = [
    "LORA_GRAPHS",
    "LORA_MAP_NAME",
    "LoraArg",
    "LoraFile",
    "LoraLayer",
    "WeightFold",
    "apply_loras_to_package",
    "canonical_weight_name",
    "describe_loras",
    "fold_array",
    "fold_lora_torch",
    "load_loras",
    "lora_initializers",
    "parse_lora_arg",
    "plan_fold",
    "read_lora",
    "unfold_lora_torch",
]
