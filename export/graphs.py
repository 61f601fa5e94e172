"""The exported graphs (four; five for SDXL): each one's ONNX contract and the torch module
that fulfils it.

As in TensorRT's demo/Diffusion `models.py`, each graph declares its export contract in one
place, a frozen `GraphSpec`: input and output names in order, their shapes with named dynamic
axes, dtypes, and how to draw a sample input. The wrapper modules take exactly the ONNX inputs
in that order, so the exporter, the verification and the tests all read the same contract.

Names and layout follow Hugging Face optimum's ONNX Stable Diffusion export
(docs/reference.md#onnx-layout). Axis names: `batch`, `sequence` (tokens); `height`/`width` are
always in latent pixels, `image_height`/`image_width` in image pixels.

SDXL, as optimum exports it (`CLIPTextOnnxConfig`, `CLIPTextWithProjectionOnnxConfig`,
`UNetOnnxConfig` with `output_hidden_states` set on both encoders): `text_encoder` adds the
outputs `hidden_states.0` … `hidden_states.L` (the embeddings, then each of its L layers, before
the final layer norm); `text_encoder_2` (CLIPTextModelWithProjection) outputs `text_embeds`,
`last_hidden_state` and the same `hidden_states.*`; the U-Net takes `text_embeds` (the pooled,
projected output of encoder 2) and `time_ids` (six sizes) after `encoder_hidden_states`, and
`timestep_cond` after those when it has a guidance embedding.

Precision: in an fp16 package every float input, weight and output is fp16 except `timestep`,
which stays float32 (diffusers computes the sinusoidal embedding in float32 and casts; Euler's
fractional timesteps lose digits in fp16), and the VAE decoder when `keeps_fp32_vae_decoder`
says the VAE overflows in fp16.

A tiny autoencoder (diffusers' AutoencoderTiny, TAESD) fills the VAE graphs under the same
names; its `vae_encoder` outputs `latents` [batch, C, height, width] (the latents themselves,
no distribution) instead of `latent_parameters`, so a runtime that reads the wrong one fails
by name rather than splitting latents into a mean and a variance.

Limits: the U-Net's latent height and width must be multiples of `2 ** (len(blocks) - 1)`
(8 for SD); diffusers' odd-size path (`forward_upsample_size`) is not in the traced graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fewstep.package import SDXL_TIME_IDS, TINY_VAE_CLASS

FLOAT = "float"  # the graph's float precision: float32 in fp32 packages, float16 in fp16 ones
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Shape entries: an int (static) or an axis name (dynamic)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = FLOAT  # FLOAT, "float32" (whatever the precision) or "int64"
    # how to draw a sample: normal | uniform (in [-1, 1]) | tokens | timestep | sizes
    fill: str = "normal"
    high: int = 0  # tokens: ids are drawn from [0, high)

    def resolved_dtype(self, precision: str) -> str:
        if self.dtype == FLOAT:
            return "float16" if precision == "fp16" else "float32"
        return self.dtype


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """The export contract of one graph (see module docstring)."""

    name: str  # package folder: text_encoder | text_encoder_2 | unet | vae_decoder | vae_encoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    make_module: Callable[[], torch.nn.Module]  # a wrapper taking exactly `inputs`, in order
    latent_multiple: int  # latent height and width must be multiples of this
    image_scale: int  # image pixels per latent pixel (the VAE's downsampling factor)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: axis name}} for inputs and outputs, as torch.onnx wants it."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, str) for d in t.shape)
        }

    def axis_sizes(self, batch: int, height: int, width: int, sequence: int) -> dict[str, int]:
        """Sizes of the named axes for a latent of height x width."""
        if height % self.latent_multiple or width % self.latent_multiple:
            raise ValueError(
                f"{self.name}: latent height and width must be multiples of "
                f"{self.latent_multiple}, got {height}x{width}"
            )
        return {
            "batch": batch,
            "sequence": sequence,
            "height": height,
            "width": width,
            "image_height": height * self.image_scale,
            "image_width": width * self.image_scale,
        }

    def sample_inputs(
        self,
        batch: int,
        height: int,
        width: int,
        sequence: int = 77,
        seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """Seeded random inputs in float32/int64 (cast to the graph's precision to feed it)."""
        sizes = self.axis_sizes(batch, height, width, sequence)
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
            if t.fill == "tokens":
                out[t.name] = rng.integers(0, t.high, size=shape, dtype=np.int64)
            elif t.fill == "timestep":  # fractional, as Euler's interpolated timesteps are
                out[t.name] = np.asarray(rng.uniform(1.0, 999.0), dtype=np.float32)
            elif t.fill == "sizes":  # SDXL's time_ids: pixel sizes and offsets, multiples of 8
                out[t.name] = (8 * rng.integers(0, 257, size=shape)).astype(np.float32)
            elif t.fill == "uniform":
                out[t.name] = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
            else:
                out[t.name] = rng.standard_normal(size=shape, dtype=np.float32)
        return out

    def cast_inputs(self, inputs: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
        """Cast sample inputs to the dtypes the exported graph declares."""
        return {
            t.name: inputs[t.name].astype(NUMPY_DTYPES[t.resolved_dtype(precision)])
            for t in self.inputs
        }

    def torch_args(self, inputs: dict[str, np.ndarray], precision: str) -> tuple[torch.Tensor, ...]:
        """Inputs as the tensors the wrapper module takes, in order, in the graph's precision."""
        cast = self.cast_inputs(inputs, precision)
        return tuple(torch.as_tensor(cast[n]) for n in self.input_names)  # keeps 0-d timestep


# ---------------------------------------------------------------------------------------------
# Wrappers: exactly the ONNX inputs, in order; exactly the ONNX outputs
# ---------------------------------------------------------------------------------------------


class TextEncoderGraph(torch.nn.Module):
    """input_ids [B, S] int64 -> CLIPTextModel: last_hidden_state [B, S, H], pooler_output
    [B, H]; CLIPTextModelWithProjection: text_embeds [B, P], last_hidden_state. With
    `hidden_states`, then hidden_states.0 … .L [B, S, H] (optimum's order)."""

    def __init__(self, text_encoder: torch.nn.Module, hidden_states: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_states = hidden_states

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.text_encoder(
            input_ids=input_ids, output_hidden_states=self.hidden_states, return_dict=True
        )
        if hasattr(out, "text_embeds"):
            first: tuple[torch.Tensor, ...] = (out.text_embeds, out.last_hidden_state)
        else:
            first = (out.last_hidden_state, out.pooler_output)
        return first + (tuple(out.hidden_states) if self.hidden_states else ())


class UNetGraph(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,  # [B, C, h, w]
        timestep: torch.Tensor,  # [] float32
        encoder_hidden_states: torch.Tensor,  # [B, S, D]
        timestep_cond: torch.Tensor | None = None,  # [B, time_cond_proj_dim] (LCM)
    ) -> torch.Tensor:
        return self.unet(
            sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False
        )[0]  # [B, C_out, h, w]


class SDXLUNetGraph(torch.nn.Module):
    """The U-Net with SDXL's added conditioning as two plain inputs (optimum's order)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,  # [B, C, h, w]
        timestep: torch.Tensor,  # [] float32
        encoder_hidden_states: torch.Tensor,  # [B, S, D]: both encoders' states, concatenated
        text_embeds: torch.Tensor,  # [B, P]: encoder 2's pooled, projected output
        time_ids: torch.Tensor,  # [B, 6]: original size, crop top-left, target size
        timestep_cond: torch.Tensor | None = None,  # [B, time_cond_proj_dim]
    ) -> torch.Tensor:
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]  # [B, C_out, h, w]


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        # [B, C, h, w] (already divided by scaling_factor) -> [B, 3, f*h, f*w]
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        # [B, 3, H, W] in [-1, 1] -> [B, 2C, H/f, W/f]: mean and log-variance, unclamped;
        # AutoencoderTiny (no quant_conv): its latents [B, C, H/f, W/f] (diffusers' encode)
        moments = self.vae.encoder(sample)
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        return moments


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


def _vae_scale(vae_config: Any) -> int:
    return 2 ** (len(vae_config.block_out_channels) - 1)


def text_encoder_spec(
    text_encoder: Any, name: str = "text_encoder", hidden_states: bool = False
) -> GraphSpec:
    """A CLIPTextModel's graph, or a CLIPTextModelWithProjection's (SDXL's encoder 2); with
    `hidden_states` (SDXL) every layer's hidden states are outputs too."""
    cfg = text_encoder.config
    hidden = cfg.hidden_size
    states = ("batch", "sequence", hidden)
    if hasattr(text_encoder, "text_projection"):
        outputs = [
            TensorSpec("text_embeds", ("batch", cfg.projection_dim)),
            TensorSpec("last_hidden_state", states),
        ]
    else:
        outputs = [
            TensorSpec("last_hidden_state", states),
            TensorSpec("pooler_output", ("batch", hidden)),
        ]
    if hidden_states:
        outputs += [
            TensorSpec(f"hidden_states.{i}", states) for i in range(cfg.num_hidden_layers + 1)
        ]
    return GraphSpec(
        name=name,
        inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64", "tokens", cfg.vocab_size),),
        outputs=tuple(outputs),
        make_module=lambda: TextEncoderGraph(text_encoder, hidden_states),
        latent_multiple=1,
        image_scale=1,
    )


def unet_spec(unet: Any, vae: Any) -> GraphSpec:
    cfg = unet.config
    inputs = [
        TensorSpec("sample", ("batch", cfg.in_channels, "height", "width")),
        TensorSpec("timestep", (), "float32", "timestep"),
        TensorSpec("encoder_hidden_states", ("batch", "sequence", cfg.cross_attention_dim)),
    ]
    sdxl = cfg.addition_embed_type == "text_time"
    if sdxl:
        pooled = (
            cfg.projection_class_embeddings_input_dim - SDXL_TIME_IDS * cfg.addition_time_embed_dim
        )
        inputs.append(TensorSpec("text_embeds", ("batch", pooled)))
        inputs.append(TensorSpec("time_ids", ("batch", SDXL_TIME_IDS), fill="sizes"))
    if cfg.time_cond_proj_dim:
        inputs.append(TensorSpec("timestep_cond", ("batch", cfg.time_cond_proj_dim)))
    wrapper = SDXLUNetGraph if sdxl else UNetGraph
    return GraphSpec(
        name="unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("out_sample", ("batch", cfg.out_channels, "height", "width")),),
        make_module=lambda: wrapper(unet),
        latent_multiple=2 ** (len(cfg.block_out_channels) - 1),
        image_scale=_vae_scale(vae.config),
    )


def vae_decoder_spec(vae: Any) -> GraphSpec:
    cfg = vae.config
    return GraphSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent_sample", ("batch", cfg.latent_channels, "height", "width")),),
        outputs=(TensorSpec("sample", ("batch", cfg.out_channels, "image_height", "image_width")),),
        make_module=lambda: VaeDecoderGraph(vae),
        latent_multiple=1,
        image_scale=_vae_scale(cfg),
    )


def is_tiny_vae(vae: Any) -> bool:
    """Whether `vae` is diffusers' AutoencoderTiny (TAESD), whose encoder returns latents."""
    return type(vae).__name__ == TINY_VAE_CLASS


def vae_encoder_spec(vae: Any) -> GraphSpec:
    cfg = vae.config
    if is_tiny_vae(vae):
        output = TensorSpec("latents", ("batch", cfg.latent_channels, "height", "width"))
    else:
        output = TensorSpec(
            "latent_parameters", ("batch", 2 * cfg.latent_channels, "height", "width")
        )
    return GraphSpec(
        name="vae_encoder",
        inputs=(
            TensorSpec(
                "sample", ("batch", cfg.in_channels, "image_height", "image_width"), fill="uniform"
            ),
        ),
        outputs=(output,),
        make_module=lambda: VaeEncoderGraph(vae),
        latent_multiple=1,
        image_scale=_vae_scale(cfg),
    )


def graph_specs(
    unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any = None
) -> list[GraphSpec]:
    """The package's graphs in export order; SDXL's when `text_encoder_2` is given."""
    sdxl = text_encoder_2 is not None
    encoders = [text_encoder_spec(text_encoder, hidden_states=sdxl)]
    if sdxl:
        encoders.append(text_encoder_spec(text_encoder_2, "text_encoder_2", hidden_states=True))
    return [*encoders, unet_spec(unet, vae), vae_decoder_spec(vae), vae_encoder_spec(vae)]


def to_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Convert a wrapper module to fp16 in place, for export; returns it.

    In place, not a copy: an SDXL U-Net is 10 GB in fp32, and the export takes the fp32
    reference outputs it verifies against before converting (package_writer).
    Text encoders switch to transformers' eager attention: the TorchScript exporter's
    `scaled_dot_product_attention` symbolic builds the `is_causal` mask in float32 and promotes
    fp16 attention to float32 with it, which leaves LayerNormalization with mixed float/float16
    inputs that onnxruntime rejects. Eager attention (softmax in float32, cast back, as
    transformers writes it) exports cleanly.
    """
    module.half()
    for sub in module.modules():
        if hasattr(sub, "set_attn_implementation"):  # a transformers PreTrainedModel
            sub.set_attn_implementation("eager")
            break
    return module


def release(module: torch.nn.Module) -> None:
    """Free a module's weights once its graphs are written: its parameters and buffers move
    to the meta device, whoever else holds the module (its configs stay readable), and the
    C heap hands what the export freed back to the system (glibc keeps it otherwise)."""
    module.to("meta")
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def keeps_fp32_vae_decoder(family: str, vae_config: Any) -> bool:
    """Whether an fp16 package keeps its VAE graphs (decoder and encoder) in fp32.

    diffusers' SDXL pipelines upcast the VAE when its config says `force_upcast` (the SDXL VAE
    overflows in fp16: NaN / black images), to decode and, in img2img, to encode; SD 1.x/2.x
    pipelines run their VAE in fp16 whatever the flag (AutoencoderKL defaults it to True, so
    SD 1.5's config carries it too). We follow the same rule.
    """
    return family == "sdxl" and bool(getattr(vae_config, "force_upcast", True))
