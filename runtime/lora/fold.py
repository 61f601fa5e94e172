"""Matching LoRA layers to a model's base weights, and the fold itself (numpy, fp32).

    W ← W + Σ_i s_i · (alpha_i / rank_i) · up_i @ down_i          (docs/reference.md#lora-files)

computed in float32 whatever W's dtype, then cast to it; a fold that makes a value inf or
NaN in W's dtype (a huge scale or alpha, an fp16 weight past 65504) is an error naming the
LoRA keys and the weight, raised before anything is written. Conv weights reshape: a 3×3
LoRA has down [r, C_in, 3, 3] and up [C_out, r, 1, 1], so up @ down is [C_out, r] @
[r, C_in·9] reshaped to [C_out, C_in, 3, 3]; a linear LoRA folds into a 1×1 conv and the
other way round (the same map). This is PEFT's `get_delta_weight`
(peft/tuners/lora/layer.py), which diffusers' `fuse_lora` calls.

Names: a weight is named as in the diffusers module (`down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q.weight`), text encoders without transformers' `text_model.`
prefix (transformers 5 dropped it from CLIPTextModel; kohya and older diffusers files keep it),
see `canonical_weight_name`. kohya files turn dots into underscores (`lora_unet_down_blocks_0_
…_attn1_to_q`); which underscores were dots is decided by matching against the real list of
base weight names, never by rules about which words contain underscores, and a name that two
base weights would both produce is an error, not a guess. kohya's SDXL files name U-Net
modules the sgm way (`lora_unet_input_blocks_4_1_…`): with the U-Net's config those names are
first translated to diffusers' (`fewstep.lora.sgm_names`), then resolved the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fewstep.lora.files import LoraFile, LoraLayer
from fewstep.lora.sgm_names import SgmNames, looks_sgm

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_MAX_LISTED = 20


def canonical_weight_name(component: str, name: str) -> str:
    """The name fewstep uses for a base weight: text encoders lose `text_model.`."""
    if component in TEXT_ENCODERS:
        return name.removeprefix("text_model.")
    return name


@dataclasses.dataclass(frozen=True)
class LoraTerm:
    """One LoRA's contribution to one weight: factor · up @ down."""

    lora: str  # the file's name
    key: str  # its down key
    factor: float  # scale · alpha / rank
    up: np.ndarray  # [out, r]
    down: np.ndarray  # [r, in · kh · kw]


@dataclasses.dataclass(frozen=True)
class WeightFold:
    """Everything to add to one base weight."""

    component: str
    weight: str  # canonical base weight name
    shape: tuple[int, ...]  # the base weight's shape, torch layout
    terms: tuple[LoraTerm, ...]

    def delta(self) -> np.ndarray:
        """Σ factor · up @ down, float32, in the base weight's shape (inf or NaN where it
        overflows: `check_folded` reports them)."""
        total: np.ndarray | None = None
        with np.errstate(over="ignore", invalid="ignore"):
            for term in self.terms:
                d = term.up @ term.down  # [out, r] @ [r, in·kh·kw], float32
                d *= np.float32(term.factor)
                total = d if total is None else total + d
        assert total is not None
        return total.reshape(self.shape)

    def non_finite_error(self, count: int, dtype: str) -> ValueError:
        """The error for a fold that made `count` values of the weight inf or NaN."""
        terms = ", ".join(
            f"{t.lora} key {t.key!r} (scale · alpha / rank = {t.factor:g})" for t in self.terms
        )
        return ValueError(
            f"folding LoRA {terms} into {self.component}.{self.weight} makes {count} of its "
            f"values inf or NaN in {dtype}, the weight's dtype: the scale, the alpha or the "
            "LoRA's values are too large for it"
        )


def fold_array(base: np.ndarray, delta: np.ndarray, transposed: bool = False) -> np.ndarray:
    """A new array: base + delta in float32, cast to base's dtype (`transposed`: base is W.T)."""
    if transposed:
        delta = delta.T
    assert base.shape == delta.shape, (base.shape, delta.shape)
    with np.errstate(over="ignore", invalid="ignore"):  # checked by check_folded
        return (base.astype(np.float32) + delta).astype(base.dtype)


def check_folded(fold: WeightFold, base: np.ndarray, folded: np.ndarray) -> None:
    """ValueError naming the LoRA keys and the weight unless `folded` (in the weight's dtype)
    is finite wherever `base` is: an fp16 weight overflows past 65504."""
    count = int(np.count_nonzero(~np.isfinite(folded) & np.isfinite(base)))
    if count:
        raise fold.non_finite_error(count, str(folded.dtype))


def _delta_shape(layer: LoraLayer, base_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape up @ down takes for a base weight of `base_shape` (None: it cannot)."""
    down, out = layer.down, int(layer.up.shape[0])
    if len(base_shape) == 2:
        if down.ndim == 4 and down.shape[2:] != (1, 1):
            return None
        return (out, int(down.shape[1]))
    if len(base_shape) == 4:
        kernel = tuple(int(k) for k in down.shape[2:]) if down.ndim == 4 else (1, 1)
        return (out, int(down.shape[1]), *kernel)
    return None


class _ComponentIndex:
    """A component's adaptable weights (2-D linear, 4-D conv), by module path."""

    def __init__(
        self,
        component: str,
        shapes: Mapping[str, tuple[int, ...]],
        config: Mapping[str, Any] | None = None,
    ):
        self.component = component
        self._config = config if component == "unet" else None
        self._sgm: SgmNames | None = None
        self.shapes = {canonical_weight_name(component, n): tuple(s) for n, s in shapes.items()}
        self.dotted: dict[str, str] = {}
        self.underscored: dict[str, list[str]] = {}
        for name, shape in self.shapes.items():
            if not name.endswith(".weight") or len(shape) not in (2, 4):
                continue
            module = name.removesuffix(".weight")
            self.dotted[module] = name
            self.underscored.setdefault(module.replace(".", "_"), []).append(name)

    def sgm(self) -> SgmNames | None:
        """kohya's sgm U-Net names, from the U-Net's config (None: not the U-Net, or no
        config given); built on first use, so only files that use them read the config."""
        if self._sgm is None and self._config is not None:
            self._sgm = SgmNames(self._config)
        return self._sgm

    def find(self, layer: LoraLayer) -> str | None:
        if layer.underscored:
            module = layer.module
            if self.component in TEXT_ENCODERS:
                module = module.removeprefix("text_model_")
            names = self.underscored.get(module, [])
            sgm = self.sgm() if not names and looks_sgm(module) else None
            if sgm is not None:
                translated = sgm.translate(module)
                names = self.underscored.get(translated, []) if translated else []
            if len(names) > 1:
                raise ValueError(
                    f"LoRA key {layer.key!r} is ambiguous in {self.component}: it names "
                    f"{' and '.join(names)}"
                )
            return names[0] if names else None
        module = layer.module
        if self.component in TEXT_ENCODERS:
            module = module.removeprefix("text_model.")
        return self.dotted.get(module)


def _listing(items: Sequence[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _sgm_hint(unmatched: Sequence[str], indexes: Mapping[str, _ComponentIndex]) -> str:
    """A note on kohya's sgm U-Net names, when unmatched keys use them."""
    if not any(looks_sgm(k.rpartition("lora_unet_")[2]) for k in unmatched if "lora_unet_" in k):
        return ""
    unet = indexes.get("unet")
    if unet is None:
        return ""
    sgm = unet.sgm()
    if sgm is None:
        return "\n(kohya sgm U-Net names such as input_blocks_… need the U-Net's config.json)"
    return f"\n({sgm.describe()})"


def plan_fold(
    loras: Sequence[tuple[LoraFile, float]],
    weights: Mapping[str, Mapping[str, tuple[int, ...]]],
    configs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> list[WeightFold]:
    """Resolve every layer of every LoRA against `weights` ({component: {name: shape}});
    `configs` ({component: its config.json}) gives the U-Net's, for kohya's sgm names.

    Raises ValueError before anything is changed: keys that match no weight (all listed),
    shape mismatches (key and both shapes), a name two base weights share, or two layers of
    one file on the same weight. Returns one WeightFold per weight touched.
    """
    configs = configs or {}
    indexes = {c: _ComponentIndex(c, shapes, configs.get(c)) for c, shapes in weights.items()}
    terms: dict[tuple[str, str], list[LoraTerm]] = {}
    unmatched: list[str] = []
    mismatched: list[str] = []
    for lora, scale in loras:
        seen: dict[tuple[str, str], str] = {}
        for layer in lora.layers:
            candidates = [layer.component] if layer.component else list(indexes)
            hits = [
                (c, name)
                for c in candidates
                if c in indexes and (name := indexes[c].find(layer)) is not None
            ]
            if not hits:
                unmatched.append(f"{lora.name}: {layer.key}")
                continue
            if len(hits) > 1:
                raise ValueError(
                    f"{lora.name}: key {layer.key!r} has no component prefix and matches "
                    f"{' and '.join(f'{c}.{n}' for c, n in hits)}"
                )
            component, name = hits[0]
            base_shape = indexes[component].shapes[name]
            shape = _delta_shape(layer, base_shape)
            if shape != base_shape:
                mismatched.append(
                    f"{lora.name}: {layer.key}: down {list(layer.down.shape)} and up "
                    f"{list(layer.up.shape)} give {list(shape) if shape else 'no weight'}, "
                    f"but {component}.{name} is {list(base_shape)}"
                )
                continue
            target = (component, name)
            if target in seen:
                raise ValueError(
                    f"{lora.name}: keys {seen[target]!r} and {layer.key!r} both adapt "
                    f"{component}.{name}"
                )
            seen[target] = layer.key
            rank = layer.rank
            terms.setdefault(target, []).append(
                LoraTerm(
                    lora=lora.name,
                    key=layer.key,
                    factor=scale * layer.alpha / rank,
                    up=layer.up.reshape(layer.up.shape[0], rank).astype(np.float32),
                    down=layer.down.reshape(rank, -1).astype(np.float32),
                )
            )
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} LoRA keys match no weight of this model "
            f"({', '.join(indexes)}):{_listing(unmatched)}{_sgm_hint(unmatched, indexes)}"
        )
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} LoRA layers do not fit the shape of their base weight:"
            f"{_listing(mismatched)}"
        )
    return [
        WeightFold(component, name, indexes[component].shapes[name], tuple(t))
        for (component, name), t in terms.items()
    ]
