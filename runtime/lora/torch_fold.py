"""LoRAs folded into torch modules in place, with the pristine weights kept for an exact unfold.

    fold_lora_torch({"unet": unet, "text_encoder": text_encoder}, [(path, scale), …])
    unfold_lora_torch({"unet": unet, "text_encoder": text_encoder})

(SDXL adds "text_encoder_2".)

Each fold *sets* the LoRAs: a weight becomes pristine + Σ deltas of exactly the LoRAs given,
computed from the kept pristine copy (never by subtracting an earlier delta), so A → B → A
leaves exactly the weights of A, and weights a previous fold touched but this one does not
are restored. Weights are updated with `.copy_()` into their existing storage, so CUDA graphs
captured on them stay valid: a replay reads the addresses it captured and would never see a
new tensor (docs/reference.md#known-failure-modes). The pristine copies live on the weight's
device, as an attribute of each module (`_fewstep_lora_pristine`); unfold restores them and
frees them.

Deltas are computed in float32 on the weight's device (`fewstep.lora.fold` has the formula)
and cast to the weight's dtype after adding; a fold that makes a value inf or NaN in that
dtype is refused before any weight changes. torch is imported here only: `fewstep.lora`
itself needs numpy and safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fewstep.lora.files import LoraArg, load_loras
from fewstep.lora.fold import WeightFold, canonical_weight_name, plan_fold

_PRISTINE = "_fewstep_lora_pristine"


def _named_weights(component: str, module: Any) -> dict[str, Any]:
    return {canonical_weight_name(component, n): p for n, p in module.named_parameters()}


def _config(module: Any) -> Mapping[str, Any] | None:
    """A diffusers model's config (a dict; the U-Net's numbers kohya's sgm names)."""
    config = getattr(module, "config", None)
    return config if isinstance(config, Mapping) else None


def _delta(fold: WeightFold, device: Any) -> Any:
    import torch

    total = None
    for term in fold.terms:
        up = torch.from_numpy(term.up).to(device)
        down = torch.from_numpy(term.down).to(device)
        d = (up @ down).mul_(term.factor)  # [out, r] @ [r, in·kh·kw], float32
        total = d if total is None else total.add_(d)
    assert total is not None
    return total.reshape(fold.shape)


def _folded(base: Any, fold: WeightFold, param: Any) -> Any:
    """base + the fold's delta in float32, cast to the weight's dtype."""
    return (base.float() + _delta(fold, param.device)).to(param.dtype)


def _check_finite(fold: WeightFold, base: Any, folded: Any) -> None:
    import torch

    count = int((~torch.isfinite(folded) & torch.isfinite(base)).sum())
    if count:
        raise fold.non_finite_error(count, str(folded.dtype).removeprefix("torch."))


def fold_lora_torch(modules: Mapping[str, Any], loras: Sequence[LoraArg]) -> list[WeightFold]:
    """Set the weights of `modules` ({component: module}) to pristine + Σ LoRA deltas.

    Components are diffusers' names: `unet`, `text_encoder`, `text_encoder_2` (SDXL; the U-Net's
    config numbers kohya's sgm block names, fewstep.lora.sgm_names). Every file is
    read, every key resolved against the modules and every new weight computed and checked to
    be finite in the weight's dtype before any weight changes (so each is computed twice: the
    new weights are not all held at once); errors are ValueErrors naming the file and key. An
    empty `loras` restores the pristine weights.
    """
    import torch

    checked = load_loras(loras)
    weights = {c: _named_weights(c, m) for c, m in modules.items()}
    folds = plan_fold(
        checked,
        {c: {n: tuple(p.shape) for n, p in w.items()} for c, w in weights.items()},
        {c: _config(m) for c, m in modules.items()},
    )
    with torch.no_grad():
        for fold in folds:
            param = weights[fold.component][fold.weight]
            kept = getattr(modules[fold.component], _PRISTINE, None) or {}
            base = kept.get(fold.weight, param)
            _check_finite(fold, base, _folded(base, fold, param))
        for component, module in modules.items():
            pristine: dict[str, Any] = getattr(module, _PRISTINE, None) or {}
            targets = {f.weight: f for f in folds if f.component == component}
            for name in [n for n in pristine if n not in targets]:
                weights[component][name].copy_(pristine.pop(name))
            for name, fold in targets.items():
                param = weights[component][name]
                if name not in pristine:
                    pristine[name] = param.detach().clone()
                param.copy_(_folded(pristine[name], fold, param))
            setattr(module, _PRISTINE, pristine)
    return folds


def unfold_lora_torch(modules: Mapping[str, Any]) -> None:
    """Restore every weight a fold changed, bit for bit, and drop the pristine copies."""
    fold_lora_torch(modules, [])
    for module in modules.values():
        if hasattr(module, _PRISTINE):
            delattr(module, _PRISTINE)
