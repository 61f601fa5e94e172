"""Reading LoRA safetensors files: the key layouts found in the wild → a list of `LoraLayer`.

Layouts (docs/reference.md#lora-files; the diffusers variants as diffusers reads them in
`loaders/lora_conversion_utils.py` and `utils/state_dict_utils.py`):

    kohya / A1111      lora_unet_<module_with_underscores>.lora_down.weight / .lora_up.weight
                       / .alpha; lora_te_ (SD1/SD2 text encoder), lora_te1_ / lora_te2_ (SDXL)
    PEFT / diffusers   [<prefix>.]<module>.lora_A.weight / .lora_B.weight, prefix unet. /
                       text_encoder. / text_encoder_2. / base_model.model. (PEFT's own
                       save_pretrained) / none
    older diffusers    <module>.lora.down.weight / .lora.up.weight (LoRACompatibleLinear),
                       <module>.lora_linear_layer.down.weight / .up.weight (text encoder),
                       <attention>.processor.to_q_lora.down.weight (attention processors:
                       to_q / to_k / to_v / to_out), with or without the unet. prefix

Alpha, per layer, first found: a `<module>.alpha` key; the PEFT config, from the safetensors
metadata `lora_adapter_metadata` (diffusers' `save_lora_weights`: `unet.lora_alpha`,
`unet.alpha_pattern`, `unet.use_rslora`, …) or an `adapter_config.json` beside the file
(PEFT's `save_pretrained`); else alpha = rank. With `use_rslora` PEFT scales by
alpha / sqrt(rank); the layer's `alpha` is then stored as lora_alpha · sqrt(rank) so that
`alpha / rank` is the factor everywhere. `alpha_pattern` keys are regular expressions from
the file: `fewstep.lora.peft_patterns` matches them as PEFT does, in bounded time.
`rank_pattern` is not read (a layer's rank is its tensors' shape).

Refused with a ValueError naming the key (not plain LoRA, and folding them as LoRA would be
wrong): LoHa (`hada_`), LoKr (`lokr_`), LoCon's Tucker mid weight (`lora_mid`), DoRA
(`dora_scale`, `lora_magnitude_vector`), LoRA biases (`lora_B.bias`); also weights that are not
floating point, and non-finite values. bf16 tensors are read by widening their bits (numpy
has no bfloat16). Only safetensors files are read: pickles (.bin, .pt, .ckpt) run code when
loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.lora.peft_patterns import PatternKeyMatcher
from fewstep.package import sha256_file

LORA_SUFFIXES = (".safetensors",)
# (key suffix, role). Order matters only where one suffix ends another; none does here.
_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # attention processors: …processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = (
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("lora_mid", "LoCon with a Tucker mid weight"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".bias", "a LoRA bias"),
)
# (key prefix, component, module names use underscores for dots)
_PREFIXES = (
    ("lora_unet_", "unet", True),
    ("lora_te1_", "text_encoder", True),
    ("lora_te2_", "text_encoder_2", True),
    ("lora_te_", "text_encoder", True),
    ("unet.", "unet", False),
    ("text_encoder_2.", "text_encoder_2", False),
    ("text_encoder.", "text_encoder", False),
    ("base_model.model.", None, False),
)
_PROCESSOR_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' loaders/lora_base.py LORA_ADAPTER_METADATA_KEY


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted weight: W ← W + scale · (alpha / rank) · up @ down."""

    component: str | None  # unet | text_encoder | text_encoder_2; None: the key didn't say
    module: str  # module path as the file names it (dots, or underscores when `underscored`)
    underscored: bool  # kohya: dots turned into underscores, resolved against real names
    down: np.ndarray  # [r, in] or [r, C_in, kh, kw]
    up: np.ndarray  # [out, r] or [C_out, r, 1, 1]
    alpha: float
    key: str  # the file's down key, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclasses.dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    format: str  # kohya | peft | diffusers (older layouts); "+"-joined when mixed
    layers: tuple[LoraLayer, ...]

    @property
    def name(self) -> str:
        return self.path.name


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _split_prefix(body: str) -> tuple[str | None, str, bool]:
    for prefix, component, underscored in _PREFIXES:
        if body.startswith(prefix):
            return component, body[len(prefix) :], underscored
    return None, body, False


def _layout(key: str) -> str:
    if ".lora_down." in key or ".lora_up." in key:
        return "kohya"
    if ".lora_A." in key or ".lora_B." in key:
        return "peft"
    return "diffusers"


def _processor_module(module: str, component: str | None) -> str:
    """`…attn1.processor.to_q` → `…attn1.to_q`; text encoders: `…self_attn.to_q` → `q_proj`."""
    head, _, proj = module.rpartition(".")
    if proj not in _PROCESSOR_PROJECTIONS:
        return module  # left for resolution to report as matching no weight
    if head.endswith(".processor") or head == "processor":
        return f"{head.removesuffix('processor').rstrip('.')}.{_PROCESSOR_PROJECTIONS[proj]}"
    if component in ("text_encoder", "text_encoder_2") or head.endswith("self_attn"):
        return f"{head}.{_TEXT_PROJECTIONS[proj]}"
    return f"{head}.{_PROCESSOR_PROJECTIONS[proj]}"


def _bf16_tensor(path: Path, key: str) -> np.ndarray:
    """A BF16 tensor of a safetensors file as float32 (bf16 is the top half of a float32)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        start, end = header[key]["data_offsets"]
        f.seek(8 + header_len + start)
        bits = np.frombuffer(f.read(end - start), dtype="<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(header[key]["shape"])


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if f.get_slice(key).get_dtype() == "BF16":
                    tensors[key] = _bf16_tensor(path, key)
                else:
                    tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"LoRA file {str(path)!r} is not a readable safetensors file: {e}") from e
    return tensors, metadata


@dataclasses.dataclass(frozen=True)
class PeftAlphas:
    """The alpha fields of one PEFT LoraConfig, checked (`rank_pattern` is not read: a
    layer's rank is its tensors' shape)."""

    lora_alpha: float | None
    patterns: tuple[tuple[PatternKeyMatcher, float], ...]  # alpha_pattern, in file order
    use_rslora: bool

    def alpha(self, module: str, rank: int) -> float | None:
        """alpha of `module`, matched as peft's `get_pattern_key` does: the first key that
        matches, else a key equal to the module name, else lora_alpha."""
        alpha = self.lora_alpha
        for matcher, value in self.patterns:
            if matcher.matches(module):
                alpha = value
                break
        else:
            alpha = next((v for m, v in self.patterns if m.key == module), alpha)
        if alpha is None:
            return None
        return alpha * math.sqrt(rank) if self.use_rslora else alpha


def _config_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a finite number, got {value!r:.80}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {value!r:.80}")
    return number


def _peft_alphas(config: Any, where: str, prefix: str) -> PeftAlphas:
    """Check one LoraConfig (a JSON object): errors name `where` (the file) and the field,
    `prefix` + its name."""
    if not isinstance(config, dict):
        raise ValueError(f"{where} {prefix}config must be a JSON object, got {config!r:.80}")
    lora_alpha = config.get("lora_alpha")
    if lora_alpha is not None:
        lora_alpha = _config_number(lora_alpha, f"{where} {prefix}lora_alpha")
    table = config.get("alpha_pattern") or {}
    if not isinstance(table, dict):
        raise ValueError(f"{where} {prefix}alpha_pattern must be an object, got {table!r:.80}")
    patterns = tuple(
        (
            PatternKeyMatcher(key, f"{where} {prefix}alpha_pattern"),
            _config_number(value, f"{where} {prefix}alpha_pattern[{key!r:.80}]"),
        )
        for key, value in table.items()
    )
    return PeftAlphas(lora_alpha, patterns, bool(config.get("use_rslora")))


def _peft_configs(path: Path, metadata: dict[str, str]) -> dict[str | None, PeftAlphas]:
    """PEFT LoraConfig alphas per component (None: a config without a component prefix)."""
    where = f"LoRA file {str(path)!r}:"
    configs: dict[str | None, dict[str, Any]] = {}
    if _METADATA_KEY in metadata:
        try:
            packed = json.loads(metadata[_METADATA_KEY])
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{where} corrupt {_METADATA_KEY} metadata: {e}") from e
        if not isinstance(packed, dict):
            raise ValueError(f"{where} {_METADATA_KEY} metadata must be a JSON object")
        for key, value in packed.items():
            component, _, field = key.rpartition(".")
            configs.setdefault(component or None, {})[field] = value
    if configs:
        return {
            c: _peft_alphas(config, where, f"{c}." if c else "") for c, config in configs.items()
        }
    sibling = path.parent / "adapter_config.json"
    if sibling.is_file():
        try:
            config = json.loads(sibling.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{sibling}: not valid JSON ({e})") from e
        return {None: _peft_alphas(config, f"{sibling}:", "")}
    return {}


def _check_finite(path: Path, key: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise ValueError(f"LoRA file {str(path)!r}: tensor {key!r} has {bad} non-finite values")


def _make_layer(
    path: Path,
    component: str | None,
    module: str,
    underscored: bool,
    parts: dict[str, tuple[str, np.ndarray]],
    configs: dict[str | None, PeftAlphas],
) -> LoraLayer:
    where = f"LoRA file {str(path)!r}"
    for role in ("down", "up"):
        if role not in parts:
            have = ", ".join(key for key, _ in parts.values())
            raise ValueError(f"{where}: module {module!r} has no {role} weight (has {have})")
    (down_key, down), (up_key, up) = parts["down"], parts["up"]
    for key, array in ((down_key, down), (up_key, up)):
        if array.dtype.kind != "f":
            raise ValueError(
                f"{where}: tensor {key!r} has dtype {array.dtype}; LoRA weights must be "
                "floating point (float16, bfloat16, float32 or float64)"
            )
        if array.ndim not in (2, 4):
            raise ValueError(
                f"{where}: tensor {key!r} must be 2-D (linear) or 4-D (conv), got shape "
                f"{list(array.shape)}"
            )
        _check_finite(path, key, array)
    rank = int(down.shape[0])
    if rank == 0:
        raise ValueError(f"{where}: tensor {down_key!r} has rank 0 (shape {list(down.shape)})")
    if up.shape[1] != rank or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise ValueError(
            f"{where}: tensor {up_key!r} of shape {list(up.shape)} does not fit "
            f"{down_key!r} of shape {list(down.shape)} (rank {rank}; up must be [out, {rank}] "
            f"or [out, {rank}, 1, 1])"
        )
    alpha: float | None = None
    if "alpha" in parts:
        alpha_key, alpha_array = parts["alpha"]
        if alpha_array.dtype.kind not in "fiu":
            raise ValueError(
                f"{where}: tensor {alpha_key!r} has dtype {alpha_array.dtype}; an alpha must "
                "be a number (floating point or integer)"
            )
        if alpha_array.size != 1:
            raise ValueError(
                f"{where}: tensor {alpha_key!r} must hold one number, got shape "
                f"{list(alpha_array.shape)}"
            )
        _check_finite(path, alpha_key, alpha_array)
        alpha = float(alpha_array.reshape(()))
    else:
        config = configs.get(component) or configs.get(None)
        if config is not None:
            alpha = config.alpha(module, rank)
    if alpha is None:
        alpha = float(rank)
    if not math.isfinite(alpha):
        raise ValueError(f"{where}: module {module!r} has a non-finite alpha {alpha!r}")
    return LoraLayer(component, module, underscored, down, up, alpha, down_key)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read and check a LoRA file; raises ValueError naming the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA file not found: {str(path)!r}")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise ValueError(
            f"LoRA file must be {'/'.join(LORA_SUFFIXES)} (pickle files run code when loaded), "
            f"got {str(path)!r}"
        )
    tensors, metadata = _read_tensors(path)
    if not tensors:
        raise ValueError(f"LoRA file {str(path)!r} holds no tensors")
    configs = _peft_configs(path, metadata)

    groups: dict[tuple[str | None, str, bool], dict[str, tuple[str, np.ndarray]]] = {}
    unknown: list[str] = []
    layouts: set[str] = set()
    for key, array in tensors.items():
        for marker, what in _UNSUPPORTED:
            if marker in key:
                raise ValueError(
                    f"LoRA file {str(path)!r}: key {key!r} belongs to {what}, which fewstep "
                    "does not fold (plain LoRA only)"
                )
        split = _split_role(key)
        if split is None:
            unknown.append(key)
            continue
        body, role = split
        component, module, underscored = _split_prefix(body)
        if key.endswith(("_lora.down.weight", "_lora.up.weight")):
            module = _processor_module(module, component)
        if role != "alpha":
            layouts.add(_layout(key))
        parts = groups.setdefault((component, module, underscored), {})
        if role in parts:
            raise ValueError(
                f"LoRA file {str(path)!r}: keys {parts[role][0]!r} and {key!r} both give the "
                f"{role} weight of module {module!r}"
            )
        parts[role] = (key, array)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:8])
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise ValueError(
            f"unknown LoRA format in {str(path)!r}: {len(unknown)} of {len(tensors)} keys are not "
            f"kohya (lora_down/lora_up/alpha) or PEFT/diffusers (lora_A/lora_B) keys: "
            f"{shown}{more}"
        )
    layers = tuple(
        _make_layer(path, component, module, underscored, parts, configs)
        for (component, module, underscored), parts in groups.items()
    )
    return LoraFile(path, sha256_file(path), "+".join(sorted(layouts)), layers)


LoraArg = tuple["str | os.PathLike[str] | LoraFile", float]


def check_scale(scale: Any, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"LoRA scale for {what} must be a finite number, got {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"LoRA scale for {what} must be a finite number, got {scale!r}")
    return float(scale)


def load_loras(loras: Sequence[LoraArg] | None) -> list[tuple[LoraFile, float]]:
    """[(path or LoraFile, scale), …] → [(LoraFile, scale), …], every file read and checked."""
    out: list[tuple[LoraFile, float]] = []
    for item in loras or ():
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"loras entries must be (path, scale) pairs, got {item!r}")
        source, scale = item
        what = source.name if isinstance(source, LoraFile) else repr(str(source))
        scale = check_scale(scale, what)
        out.append((source if isinstance(source, LoraFile) else read_lora(source), scale))
    return out


def parse_lora_arg(text: str) -> tuple[str, float]:
    """The command line's `PATH[:SCALE]` (scale 1.0 when absent) → (path, scale)."""
    path, sep, tail = text.rpartition(":")
    if sep and path and not tail.startswith(("\\", "/")):
        try:
            return path, check_scale(float(tail), repr(path))
        except ValueError as e:
            if os.path.exists(text):
                return text, 1.0
            raise ValueError(
                f"--lora must be PATH or PATH:SCALE with a finite SCALE, got {text!r}"
            ) from e
    return text, 1.0


def describe_loras(loras: Sequence[tuple[LoraFile, float]], folded_at: str) -> list[dict]:
    """The manifest's `loras` entries."""
    return [
        {
            "name": lora.name,
            "path": str(lora.path.resolve()),
            "sha256": lora.sha256,
            "scale": scale,
            "format": lora.format,
            "layers": len(lora.layers),
            "folded_at": folded_at,
        }
        for lora, scale in loras
    ]
