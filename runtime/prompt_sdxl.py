"""SDXL's conditioning: two text encoders, a pooled text embedding and the size `time_ids`.

Follows diffusers' `StableDiffusionXLPipeline` (`encode_prompt`, `_get_add_time_ids` and step 7
of `__call__`), on the graphs of optimum's SDXL layout (docs/reference.md#onnx-layout):

- `prompt` goes through `tokenizer/` + `text_encoder`, `prompt_2` (default: `prompt`, also
  when "") through `tokenizer_2/` + `text_encoder_2`. Each encoder's penultimate hidden states
  (output `hidden_states.{L-1}` of L layers; `hidden_states.L` precedes the final layer norm)
  are concatenated on the channel axis: the U-Net's `encoder_hidden_states` [B, 77, C1 + C2].
  Encoder 2's `text_embeds` (pooled, projected) is the U-Net's `text_embeds`.
- Negatives, with classifier-free guidance: when `negative_prompt` is None and the model's
  `force_zeros_for_empty_prompt` (model_index.json, default true) holds, both are zeros, and
  `negative_prompt_2` is ignored, as in diffusers; otherwise `negative_prompt` ("" when None)
  and `negative_prompt_2` (default: `negative_prompt`) are encoded like the prompts, in the
  same text encoder call ([uncond; cond]).
- `time_ids` [B, 6]: `original_size` + `crops_coords_top_left` + `target_size`, (height, width)
  pairs (the crop's (top, left)), by default (height, width), (0, 0), (height, width). The
  unconditional half gets `negative_original_size` + `negative_crops_coords_top_left` +
  `negative_target_size` when the first and last are given, else the same ids.
- img2img (diffusers' `StableDiffusionXLImg2ImgPipeline` without aesthetic scores, as the base
  model and SDXL-Turbo ship): the same, with (height, width) the size the input image is
  encoded at.

Deviation: diffusers' text-to-image pipeline stacks the time ids as [negative, positive]
repeated per image, which pairs rows with the wrong half once negative sizes differ from the
positive ones and a call makes more than one image; here each half gets its own rows (the same
thing for one image).
Giving only one of `negative_original_size` and `negative_target_size`, or the negative crop
without both, is a ValueError rather than silently ignored. img2img follows the same rules,
where diffusers' SDXL img2img pipeline gives the unconditional half the positive crop (its
`negative_crops_coords_top_left` is ignored) and fills a missing negative size with the
positive one; calls without negative sizes, or with both and no crop on either half, agree.

Limits: no `clip_skip`, no precomputed embeddings, no refiner (aesthetic-score time ids). The
conditioning is assembled on the host with numpy and moved to the backend once per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.backends.base import Backend
from fewstep.inputs import check_integer, check_text, check_texts
from fewstep.package import SDXL_TIME_IDS, PackageError, read_json
from fewstep.tokenizer import CLIPTokenizer

SDXL_ARGUMENTS = (
    "prompt_2",
    "negative_prompt_2",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)
# Bound on size-conditioning values: 4x past the largest images SDXL was trained on, and far
# inside fp16 (the U-Net of an fp16 package takes time_ids in fp16).
MAX_SIZE_CONDITIONING = 16384


@dataclasses.dataclass(frozen=True)
class SizeConditioning:
    """One half's size conditioning, as diffusers' `_get_add_time_ids` orders it."""

    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def time_ids(self) -> list[int]:
        return [*self.original_size, *self.crops_coords_top_left, *self.target_size]


@dataclasses.dataclass(frozen=True)
class SDXLInputs:
    """A call's SDXL arguments, checked and resolved."""

    prompts_2: list[str]
    negative_prompts_2: list[str]
    zero_negatives: bool  # guided calls: zeros for the unconditional embeddings
    size: SizeConditioning
    negative_size: SizeConditioning

    def settings(self) -> dict[str, Any]:
        """The resolved values, for PipelineOutput.settings."""
        return {
            "prompt_2": self.prompts_2,
            "negative_prompt_2": self.negative_prompts_2,
            **{k: list(v) for k, v in dataclasses.asdict(self.size).items()},
            **{f"negative_{k}": list(v) for k, v in dataclasses.asdict(self.negative_size).items()},
        }


def refuse_sdxl_arguments(family: str, given: dict[str, Any]) -> None:
    """ValueError naming an SDXL argument given to a model of another family."""
    for name in SDXL_ARGUMENTS:
        if given.get(name) is not None:
            raise ValueError(
                f"{name} applies to SDXL models only; this model's family is {family!r} "
                f"(got {name}={given[name]!r:.80})"
            )


def check_pair(name: str, value: Any, what: str) -> tuple[int, int]:
    """A (list or tuple) pair of integers in [0, MAX_SIZE_CONDITIONING]."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a {what} pair of integers, got {value!r:.80}")
    first, second = (
        check_integer(f"{name}[{i}]", v, 0, MAX_SIZE_CONDITIONING) for i, v in enumerate(value)
    )
    return first, second


def second_prompts(name: str, value: Any, firsts: list[str], max_chars: int) -> list[str]:
    """`prompt_2`-style texts: the first prompts when None or "" (diffusers' `value or
    first`), one string for every prompt, or a list of one per prompt."""
    if value is None or (isinstance(value, str) and not value):
        return list(firsts)
    if isinstance(value, str):
        return [check_text(name, value, max_chars)] * len(firsts)
    texts = check_texts(name, value, max_chars)
    if len(texts) != len(firsts):
        raise ValueError(f"{name} must have one entry per prompt ({len(firsts)}), got {len(texts)}")
    return texts


def check_size_conditioning(
    height: int, width: int, given: dict[str, Any]
) -> tuple[SizeConditioning, SizeConditioning]:
    """(positive, negative) size conditioning from the call's arguments (module docstring)."""
    image = (height, width)

    def pair(name: str, default: tuple[int, int], what: str = "(height, width)") -> Any:
        value = given.get(name)
        return default if value is None else check_pair(name, value, what)

    size = SizeConditioning(
        pair("original_size", image),
        pair("crops_coords_top_left", (0, 0), "(top, left)"),
        pair("target_size", image),
    )
    negatives = ("negative_original_size", "negative_target_size")
    present = [n for n in negatives if given.get(n) is not None]
    if len(present) == 1:
        missing = next(n for n in negatives if n not in present)
        raise ValueError(
            f"{present[0]} needs {missing} too (diffusers' text-to-image pipeline ignores one "
            "without the other), "
            f"got {present[0]}={given[present[0]]!r:.80} and {missing}=None"
        )
    if not present:
        if given.get("negative_crops_coords_top_left") is not None:
            raise ValueError(
                "negative_crops_coords_top_left needs negative_original_size and "
                "negative_target_size (without them the negative size conditioning is the "
                f"positive one), got {given['negative_crops_coords_top_left']!r:.80}"
            )
        return size, size
    negative = SizeConditioning(
        pair("negative_original_size", image),
        pair("negative_crops_coords_top_left", (0, 0), "(top, left)"),
        pair("negative_target_size", image),
    )
    return size, negative


def penultimate_hidden_states(outputs: dict[str, Any], graph: str) -> np.ndarray:
    """`hidden_states.{L-1}` of a text encoder's outputs `hidden_states.0` … `.L`."""
    count = sum(1 for name in outputs if name.startswith("hidden_states."))
    name = f"hidden_states.{count - 2}"
    if count < 2 or name not in outputs:
        raise PackageError(
            f"{graph}: the graph lacks the per-layer outputs hidden_states.0 … (got "
            f"{sorted(outputs)}); SDXL conditions on the penultimate layer, so export the "
            "package with fewstep or optimum's SDXL exporter"
        )
    return np.asarray(outputs[name], dtype=np.float32)


class SDXLTextEncoders:
    """What an SDXL package adds to the pipeline: the second tokenizer, the
    `force_zeros_for_empty_prompt` flag and the widths checked against each other."""

    def __init__(
        self, tokenizer_2: CLIPTokenizer, force_zeros_for_empty_prompt: bool, pooled_dim: int
    ):
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.pooled_dim = pooled_dim

    @classmethod
    def from_folder(cls, root: str | Path) -> SDXLTextEncoders:
        """Read from an SDXL package (or diffusers folder); PackageError naming the file and
        key of anything missing or inconsistent."""
        root = Path(root)
        index_path = root / "model_index.json"
        index = read_json(index_path) if index_path.is_file() else {}
        force_zeros = index.get("force_zeros_for_empty_prompt", True)
        if not isinstance(force_zeros, bool):
            raise PackageError(
                f"{index_path}: force_zeros_for_empty_prompt must be true or false, got "
                f"{force_zeros!r:.80}"
            )
        return cls(
            CLIPTokenizer.from_folder(root / "tokenizer_2"),
            force_zeros,
            _pooled_dim(root),
        )

    def check(
        self,
        prompts: list[str],
        negatives: list[str],
        negative_prompt_given: bool,
        height: int,
        width: int,
        max_chars: int,
        given: dict[str, Any],
    ) -> SDXLInputs:
        """Check a call's SDXL arguments (`given`: name → value, SDXL_ARGUMENTS)."""
        size, negative_size = check_size_conditioning(height, width, given)
        return SDXLInputs(
            prompts_2=second_prompts("prompt_2", given.get("prompt_2"), prompts, max_chars),
            negative_prompts_2=second_prompts(
                "negative_prompt_2", given.get("negative_prompt_2"), negatives, max_chars
            ),
            zero_negatives=self.force_zeros_for_empty_prompt and not negative_prompt_given,
            size=size,
            negative_size=negative_size,
        )

    def conditioning(
        self,
        backend: Backend,
        tokenizer: CLIPTokenizer,
        prompts: list[str],
        negatives: list[str],
        args: SDXLInputs,
        do_cfg: bool,
        per_prompt: int,
    ) -> dict[str, Any]:
        """The U-Net's conditioning inputs, [uncond; cond] when guiding, each prompt's rows
        repeated `per_prompt` times: encoder_hidden_states, text_embeds, time_ids."""
        encode_negatives = do_cfg and not args.zero_negatives
        texts = negatives + prompts if encode_negatives else prompts
        texts_2 = args.negative_prompts_2 + args.prompts_2 if encode_negatives else args.prompts_2
        states, pooled = self.encode(backend, tokenizer, texts, texts_2)
        if do_cfg and args.zero_negatives:
            states = np.concatenate([np.zeros_like(states), states])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        batch = len(prompts) * per_prompt
        halves = [args.negative_size, args.size] if do_cfg else [args.size]
        time_ids = np.array(
            [half.time_ids() for half in halves for _ in range(batch)], dtype=np.float32
        )
        ops = backend.array_ops
        return {
            "encoder_hidden_states": ops.asarray(np.repeat(states, per_prompt, axis=0)),
            "text_embeds": ops.asarray(np.repeat(pooled, per_prompt, axis=0)),
            "time_ids": ops.asarray(time_ids),
        }

    def encode(
        self,
        backend: Backend,
        tokenizer: CLIPTokenizer,
        texts: Sequence[str],
        texts_2: Sequence[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """(hidden states [N, 77, C1 + C2], pooled [N, P]) on the host, float32."""
        out_1 = backend.run("text_encoder", input_ids=tokenizer(list(texts)))
        out_2 = backend.run("text_encoder_2", input_ids=self.tokenizer_2(list(texts_2)))
        if "text_embeds" not in out_2:
            raise PackageError(
                f"text_encoder_2: the graph lacks the output text_embeds (got {sorted(out_2)}); "
                "SDXL's second encoder is a CLIPTextModelWithProjection"
            )
        states = np.concatenate(
            [
                penultimate_hidden_states(out_1, "text_encoder"),
                penultimate_hidden_states(out_2, "text_encoder_2"),
            ],
            axis=-1,
        )
        return states, np.asarray(out_2["text_embeds"], dtype=np.float32)


def _pooled_dim(root: Path) -> int:
    """Width of `text_embeds`: the U-Net's added-embedding input less the six embedded time
    ids, which must equal encoder 2's projection_dim (diffusers raises this at call time)."""
    unet_path = root / "unet" / "config.json"
    unet = read_json(unet_path)
    added = _positive_int(unet, "projection_class_embeddings_input_dim", unet_path)
    time_dim = _positive_int(unet, "addition_time_embed_dim", unet_path)
    pooled = added - SDXL_TIME_IDS * time_dim
    encoder_path = root / "text_encoder_2" / "config.json"
    projection = read_json(encoder_path).get("projection_dim")
    if projection != pooled:
        raise PackageError(
            f"{encoder_path}: projection_dim ({projection!r}) must equal {unet_path} "
            f"projection_class_embeddings_input_dim - {SDXL_TIME_IDS} x addition_time_embed_dim "
            f"({added} - {SDXL_TIME_IDS} x {time_dim} = {pooled})"
        )
    return pooled


def _positive_int(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PackageError(f"{path}: {key} must be a positive integer for SDXL, got {value!r:.80}")
    return value
