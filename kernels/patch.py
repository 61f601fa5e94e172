"""Swap fewstep.kernels into diffusers U-Nets and VAEs, in place: `patch(module)` / `unpatch`.

What is swapped (diffusers 0.42; modules are recognised by class name and attributes, so
this file imports torch only):

- GroupNorm → SiLU pairs, for the fused `fewstep::group_norm(..., activation="silu")`:
  `ResnetBlock2D` (models/resnet.py, `forward`: norm1 → nonlinearity, and norm2 →
  nonlinearity for every `time_embedding_norm` but "scale_shift", which puts the time
  embedding's scale and shift between them) and the `conv_norm_out → conv_act`
  tail of `UNet2DConditionModel` (unets/unet_2d_condition.py) and of the VAE's `Encoder` /
  `Decoder` (autoencoders/vae.py). The block's `nonlinearity` becomes an identity; it also
  activates the time embedding (`temb = nonlinearity(temb)` before `time_emb_proj`), so
  `time_emb_proj` becomes `SiLULinear`, a linear layer that applies SiLU to its input first.
  Blocks without up- or downsampling (all of an SD U-Net's and VAE's) then become
  `FusedResnetBlock`, which adds the time embedding ("default" norm) inside norm2's kernel
  (its `input_bias`) rather than in a pass of its own, and skips the division of the
  output by an `output_scale_factor` of 1 (a pass over the output that changes nothing).
- Every other `nn.GroupNorm` (the transformer blocks' `norm`, the VAE attention's
  `group_norm`) → the same op without activation.
- `Attention` modules whose processor is diffusers' `AttnProcessor2_0` (or `AttnProcessor`)
  → `FewstepAttnProcessor`: AttnProcessor2_0's math step for step, with SDPA replaced by
  `fewstep::attention` (or, with `attention=False`, SDPA still), and no division of its
  output by a `rescale_output_factor` of 1 (a pass that changes nothing). Custom processors
  (IP-adapter, LoRA, …) are left alone.
- `GEGLU` activations (diffusers' models/activations.py: the transformer blocks'
  feed-forward) → `FusedGEGLU`: their projection, then `fewstep::geglu` in place of the
  split, F.gelu and product (two elementwise kernels).
- `nn.LayerNorm`s over one dim (the transformer blocks' norm1, norm2, norm3) →
  `FusedLayerNorm`, `fewstep::layer_norm` on the original weight and bias.
- `Upsample2D`s that upsample ×2 (nearest) then run a 3×3 convolution (the U-Net's and VAE
  decoder's upsamplers) → `FusedUpsampleConv`: one stride-2 transposed convolution with
  4×4 weights made from the 3×3 ones, the same map without the upsampled tensor in
  between and with 4 taps per output pixel where the convolution had 9 (the VAE's three
  upsample convolutions are about 0.7 of its 2.5 TFLOP per 512² image).
- 1×1 `nn.Conv2d`s (stride 1, no padding, one group: SD1.5's transformer `proj_in` and
  `proj_out`, ResNet `conv_shortcut`s) → `PointwiseConv`: on a channels_last input, a matrix
  product over the input's own memory with the bias added by the GEMM (cuDNN's convolutions
  add it in a pass of their own); other layouts run the convolution.
- `Transformer2DModel`s (continuous inputs) give their output in the residual's memory
  format: in a channels_last model their tokens [B, H·W, C] already are channels_last
  [B, C, H, W], and diffusers' `.contiguous()` made an NCHW copy that the next convolution
  (or the residual add) turned back, two transposing copies per block for no change of value.

Replacements share the original parameters (same `Parameter` objects under the same names),
so state dicts, in-place weight updates (LoRA folding) and CUDA graphs see one set of weights.
The custom ops fall back to torch where a kernel does not apply (ops.py), so a patched model
runs anywhere; it is only fast where the Triton kernels run (CUDA).

The swaps are one table, `REWRITES`: each entry names its count in `PatchReport` and the
`patch` keyword (switch) that turns it on, says where it applies and builds the
replacement, so a new kernel is one entry (KERNEL_NAMES and the report follow from it).

`patch` is idempotent (a second call swaps nothing, but for processors it upgrades to the
kernel) and `unpatch` restores the original modules, processors and methods.

Deviations: a call with an `attention_mask` runs SDPA with the mask, as AttnProcessor2_0
(the kernel has no mask; SD's U-Net passes none). AttnProcessor2_0 ignores `attn.scale`
(SDPA's default 1/√D); so does this processor.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .ops import attention_op, geglu_op, group_norm_op, kernels_disabled, layer_norm_op
from .tuning import choose, signature

RESNET_CLASSES = ("ResnetBlock2D",)
# Classes whose forward runs `conv_norm_out` then `conv_act` back to back.
NORM_OUT_CLASSES = ("UNet2DConditionModel", "Encoder", "Decoder")
ATTENTION_CLASSES = ("Attention",)
TRANSFORMER_CLASSES = ("Transformer2DModel",)
UPSAMPLE_CLASSES = ("Upsample2D",)
GEGLU_CLASSES = ("GEGLU",)
# Processors whose math FewstepAttnProcessor reproduces.
REPLACEABLE_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")

_RECORD = "_fewstep_kernel_patches"


class FusedGroupNorm(nn.Module):
    """`nn.GroupNorm` (+ SiLU) as `fewstep::group_norm`, on the original weight and bias."""

    def __init__(self, norm: nn.GroupNorm, activation: str | None, tune: bool = False):
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.activation = activation
        self.tune = tune
        self.weight = norm.weight  # shared Parameter (None when not affine)
        self.bias = norm.bias

    def forward(self, x: torch.Tensor, input_bias: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm_op(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            self.activation,
            input_bias,
            self.tune,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, activation={self.activation}"
        )


class SiLULinear(nn.Module):
    """linear(silu(x)) on the original Linear's weight and bias: a ResNet block's
    `time_emb_proj` once its `nonlinearity` (which also activated the time embedding) is gone."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(x), self.weight, self.bias)


class PointwiseConv(nn.Module):
    """A 1×1 convolution (stride 1, no padding, one group) on a channels_last input as the
    matrix product it is, [N·H·W, C_in] × [C_in, C_out] over the input's own memory, with the
    bias added by the GEMM: cuDNN's convolutions add theirs in a pass of their own (ATen's
    cudnn/ConvShared.cpp). The output is channels_last, as cuDNN's. Other layouts and
    FEWSTEP_DISABLE_KERNELS=1 run the convolution; `tune`: per shape, the faster of the two
    (tuning.py). Holds the convolution's own weight and bias (the state dict is unchanged)."""

    def __init__(self, conv: nn.Conv2d, tune: bool = False):
        super().__init__()
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.weight = conv.weight  # [C_out, C_in, 1, 1], shared Parameter
        self.bias = conv.bias
        self.tune = tune

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution with `bias` in place of its own."""

        def conv() -> torch.Tensor:
            return F.conv2d(x, self.weight, bias)

        def matmul() -> torch.Tensor:
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view of channels_last
            y = F.linear(rows, self.weight.view(self.out_channels, c), bias)
            return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)

        if kernels_disabled() or not x.is_contiguous(memory_format=torch.channels_last):
            return conv()
        if not self.tune:
            return matmul()
        candidates = {"conv": conv, "matmul": matmul}
        key = signature(x, self.weight, bias)
        return candidates[choose("pointwise_conv", key, candidates, x.device, reference="conv")]()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1)"


def _pointwise(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _bias_apart(conv: nn.Module) -> bool:
    """Whether conv is a plain Conv2d (or PointwiseConv) whose bias may be added elsewhere (a
    wrapper, e.g. a LoRA layer, runs its own forward)."""
    return type(conv) in (nn.Conv2d, PointwiseConv) and conv.bias is not None


def _convolve(conv: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A _bias_apart convolution of x with `bias` in place of its own."""
    if isinstance(conv, PointwiseConv):
        return conv.project(x, bias)
    return conv._conv_forward(x, conv.weight, bias)


class FusedResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D (models/resnet.py) without up- or downsampling, once its
    GroupNorm → SiLU pairs are fused, without passes of its own for what the next op can
    add: cuDNN's convolutions leave the bias to a pass over their output (ATen's
    cudnn/ConvShared.cpp), so conv1's bias goes into norm2's kernel with the projected time
    embedding ("default" norm; both added before its statistics), and where the shortcut
    is a convolution, conv2's bias joins the shortcut's (one bias for both, added by the
    GEMM where the shortcut is a PointwiseConv). A division by an output_scale_factor of 1
    is skipped. Exact but for rounding. The block's own modules, under their own names (the
    state dict is unchanged)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name in ("norm1", "conv1", "time_emb_proj", "norm2", "dropout", "conv2"):
            setattr(self, name, getattr(block, name))  # time_emb_proj: a module or None
        self.conv_shortcut = block.conv_shortcut  # a module or None
        self.output_scale_factor = block.output_scale_factor
        # other norms ("group", in VAEs) project no time embedding into the block
        self.adds_time_embedding = (
            block.time_embedding_norm == "default" and block.time_emb_proj is not None
        )
        self.train(block.training)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
        hidden = self.norm1(input_tensor)  # GroupNorm → SiLU
        shift = None  # [N, C]: norm2's input bias
        if self.adds_time_embedding and temb is not None:
            shift = self.time_emb_proj(temb)
        apart = not kernels_disabled()  # disabled: diffusers' order, the same numbers
        if apart and _bias_apart(self.conv1):
            hidden = _convolve(self.conv1, hidden, None)
            bias = self.conv1.bias.expand(hidden.shape[0], -1)
            shift = bias if shift is None else shift + bias
        else:
            hidden = self.conv1(hidden)
        hidden = self.dropout(self.norm2(hidden, shift))
        shortcut_conv = self.conv_shortcut
        if (
            apart
            and shortcut_conv is not None
            and _bias_apart(shortcut_conv)
            and _bias_apart(self.conv2)
        ):
            hidden = _convolve(self.conv2, hidden, None)
            bias = shortcut_conv.bias + self.conv2.bias
            shortcut = _convolve(shortcut_conv, input_tensor, bias)
        else:
            hidden = self.conv2(hidden)
            shortcut = input_tensor if shortcut_conv is None else shortcut_conv(input_tensor)
        out = shortcut + hidden
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class FusedLayerNorm(nn.Module):
    """`nn.LayerNorm` over the last dim as `fewstep::layer_norm`, on the original weight and
    bias (None when not affine)."""

    def __init__(self, norm: nn.LayerNorm, tune: bool = False):
        super().__init__()
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.tune = tune

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_op(x, self.weight, self.bias, self.eps, self.tune)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


# conv3x3(nearest ×2 upsample of x) = conv_transpose2d(x, W', stride 2, padding 1): output
# pixel o = 2q + r takes input pixels q - 1, q (r = 0) or q, q + 1 (r = 1), and tap k of the
# transposed kernel (o = 2·i − 1 + k) sums the 3×3 taps t that land there. Rows: k = 0..3;
# columns: t = 0..2 (diffusers' kernel, cross-correlation order).
_UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsample_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The [C_in, C_out, 4, 4] transposed-convolution weight equal to a 3×3 convolution's
    [C_out, C_in, 3, 3] `weight` applied after a nearest ×2 upsample; summed in fp32, then
    in the weight's dtype (fp64 stays fp64)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    taps = torch.tensor(_UPSAMPLE_TAPS, dtype=compute, device=weight.device)
    fused = torch.einsum("kt,oits,ls->iokl", taps, weight.to(compute), taps)
    return fused.to(weight.dtype)


class FusedUpsampleConv(nn.Module):
    """diffusers' Upsample2D (models/upsampling.py) with `use_conv`, nearest ×2 interpolation,
    a 3×3 convolution with padding 1 and no norm, as one stride-2 transposed convolution
    (see upsample_conv_weight). The convolution keeps its name (`conv` or `Conv2d_0`), so the
    state dict is unchanged, and the fused weight is made from it on every call, so in-place
    weight updates (LoRA folding) and CUDA graphs see the current one. An `output_size` other
    than ×2, or FEWSTEP_DISABLE_KERNELS=1, runs diffusers' interpolate-then-convolve; so
    does `tune` (per shape, the faster of the two: tuning.py) where it cannot time."""

    def __init__(self, upsample: nn.Module, tune: bool = False):
        super().__init__()
        self.conv_name = upsample.name if upsample.name == "conv" else "Conv2d_0"
        setattr(self, self.conv_name, getattr(upsample, self.conv_name))
        self.channels = upsample.channels
        self.tune = tune

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None, *args, **kwargs):
        conv = getattr(self, self.conv_name)
        doubled = [2 * n for n in hidden_states.shape[-2:]]
        size = doubled if output_size is None else list(output_size)

        def diffusers_path() -> torch.Tensor:
            return conv(F.interpolate(hidden_states, size=size, mode="nearest"))

        def transposed() -> torch.Tensor:
            weight = upsample_conv_weight(conv.weight)
            return F.conv_transpose2d(hidden_states, weight, conv.bias, stride=2, padding=1)

        if kernels_disabled() or size != doubled:
            return diffusers_path()
        if not self.tune:
            return transposed()
        candidates = {"diffusers": diffusers_path, "transposed": transposed}
        key = signature(hidden_states, conv.weight)
        device = hidden_states.device
        return candidates[choose("upsample_conv", key, candidates, device, reference="diffusers")]()


def _fusable_upsample(module: nn.Module) -> bool:
    """An Upsample2D that interpolates ×2 then convolves 3×3 with padding 1, nothing else."""
    conv = getattr(module, "conv" if getattr(module, "name", None) == "conv" else "Conv2d_0", None)
    return (
        _name(module) in UPSAMPLE_CLASSES
        and getattr(module, "use_conv", False)
        and not getattr(module, "use_conv_transpose", True)
        and getattr(module, "interpolate", False)
        and getattr(module, "norm", "missing") is None
        and type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class FusedGEGLU(nn.Module):
    """diffusers' GEGLU as its own projection, then `fewstep::geglu` (h · gelu(g) in one
    pass) for the split, GELU and product."""

    def __init__(self, geglu: nn.Module, tune: bool = False):
        super().__init__()
        self.proj = geglu.proj  # the original Linear, under its own name
        self.tune = tune

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return geglu_op(self.proj(hidden_states), self.tune)


class FewstepAttnProcessor:
    """diffusers' AttnProcessor2_0 (models/attention_processor.py) with `fewstep::attention`
    in place of F.scaled_dot_product_attention (`kernel=False`: SDPA still): self- and
    cross-attention, 3-D and 4-D inputs, spatial_norm / group_norm / norm_cross / norm_q /
    norm_k when the module has them, residual connection and rescale_output_factor.
    tune: per shape, the faster of SDPA and the kernel (tuning.py)."""

    def __init__(self, kernel: bool = True, tune: bool = False):
        self.kernel = kernel
        self.tune = tune

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            # [B, C, H, W] → [B, H·W, C] (a free view for channels_last)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # [B, L, H·D] → [B, H, L, D] views: the kernel reads them without a copy.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None and self.kernel:
            # [B, H, L_q, D], laid out [B, L, H, D]
            hidden_states = attention_op(query, key, value, tune=self.tune)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor == 1:  # dividing by 1 is a pass that changes nothing
            return hidden_states
        return hidden_states / attn.rescale_output_factor


def _continuous_output_in_residual_layout(
    self: Any,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    batch_size: int,
    height: int,
    width: int,
    inner_dim: int,
) -> torch.Tensor:
    """Transformer2DModel._get_output_for_continuous_inputs (diffusers'
    models/transformers/transformer_2d.py) with `.contiguous()` in the residual's memory
    format: for channels_last, the [B, H·W, C] → [B, C, H, W] view is already it."""
    channels_last = residual.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last and not residual.is_contiguous() else None

    def to_image(tokens: torch.Tensor) -> torch.Tensor:
        image = tokens.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        return image.contiguous(memory_format=layout or torch.contiguous_format)

    if self.use_linear_projection:
        hidden_states = to_image(self.proj_out(hidden_states))
    else:
        hidden_states = self.proj_out(to_image(hidden_states))
    return hidden_states + residual


_TRANSFORMER_OUTPUT = "_get_output_for_continuous_inputs"


def _name(module: Any) -> str:
    return type(module).__name__


def _fusable_resnet(block: nn.Module) -> bool:
    """ResnetBlock2D whose forward is norm1 → SiLU → … → norm2 → SiLU (any time_embedding_norm
    but "scale_shift": "default" in U-Nets, "group" in VAE decoders), with a time projection we
    can give the SiLU to (or none)."""
    proj = getattr(block, "time_emb_proj", None)
    return (
        _name(block) in RESNET_CLASSES
        and isinstance(getattr(block, "norm1", None), nn.GroupNorm)
        and isinstance(getattr(block, "norm2", None), nn.GroupNorm)
        and isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
        and getattr(block, "time_embedding_norm", "scale_shift") != "scale_shift"
        and (proj is None or getattr(block, "skip_time_act", False) or type(proj) is nn.Linear)
    )


def _norm_out_pair(module: nn.Module) -> bool:
    """A model whose forward runs `conv_norm_out` (a GroupNorm) then `conv_act` (a SiLU)."""
    return (
        _name(module) in NORM_OUT_CLASSES
        and isinstance(getattr(module, "conv_norm_out", None), nn.GroupNorm)
        and isinstance(getattr(module, "conv_act", None), nn.SiLU)
    )


def _runs_as_fused_block(block: nn.Module) -> bool:
    """A ResnetBlock2D with its GroupNorm → SiLU pairs fused (so not "scale_shift", whose
    norm2 keeps its own module) and no up- or downsampling: what FusedResnetBlock computes."""
    return (
        _name(block) in RESNET_CLASSES
        and isinstance(getattr(block, "norm2", None), FusedGroupNorm)
        and block.norm2.activation == "silu"
        and block.upsample is None
        and block.downsample is None
    )


def _geglu(module: nn.Module) -> bool:
    return _name(module) in GEGLU_CLASSES and type(getattr(module, "proj", None)) is nn.Linear


def _layer_norm_over_one_dim(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1


# -- the table of rewrites ---------------------------------------------------------------

PASSES = "passes"  # the switch of rewrites that only drop passes which change no value


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a rewrite builds with: the switches one `patch` call turned on, and `tune`."""

    on: frozenset[str]
    tune: bool


@dataclasses.dataclass(frozen=True)
class Change:
    """One edit of a module: its `attr` becomes `new`, set (and undone by `unpatch`) as
    `kind` says: "module" (an attribute or child module), "processor" (`set_processor`),
    "method" (an instance attribute over the class's method). `counted`: one of the
    report's units (False: what comes with one, e.g. the SiLU a fused op took over)."""

    kind: Literal["module", "processor", "method"]
    attr: str
    new: Any
    counted: bool = True


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One kind of swap `patch` makes, where any of its `switches` (patch() keywords) is
    on. `changes(module, settings)` says what to change on one module of the tree (none
    where it does not apply); each counted change adds 1 to the report's `name`, a count
    of `unit`s."""

    name: str
    switches: tuple[str, ...]
    unit: str

    def changes(self, module: nn.Module, settings: Settings) -> list[Change]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SwapChild(Rewrite):
    """Each child module for which `applies_to` holds becomes `build(child, settings)`."""

    applies_to: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, Settings], nn.Module]

    def changes(self, module: nn.Module, settings: Settings) -> list[Change]:
        return [
            Change("module", attr, self.build(child, settings))
            for attr, child in module.named_children()
            if self.applies_to(child)
        ]


@dataclasses.dataclass(frozen=True)
class EditModule(Rewrite):
    """`edits(module, settings)`: the changes to a module itself (none where it does not
    apply)."""

    edits: Callable[[nn.Module, Settings], list[Change]]

    def changes(self, module: nn.Module, settings: Settings) -> list[Change]:
        return self.edits(module, settings)


def _group_norm_silu_edits(module: nn.Module, settings: Settings) -> list[Change]:
    """A ResNet block's GroupNorm → SiLU pairs, or a model's conv_norm_out → conv_act tail,
    as FusedGroupNorm(..., "silu"); the SiLU becomes an identity, and a time projection it
    also activated, a SiLULinear."""
    if _fusable_resnet(module):
        changes = [
            Change("module", "norm1", FusedGroupNorm(module.norm1, "silu", settings.tune)),
            Change("module", "norm2", FusedGroupNorm(module.norm2, "silu", settings.tune)),
            Change("module", "nonlinearity", nn.Identity(), counted=False),
        ]
        if module.time_emb_proj is not None and not module.skip_time_act:
            silu_linear = SiLULinear(module.time_emb_proj)
            changes.append(Change("module", "time_emb_proj", silu_linear, counted=False))
        return changes
    if _norm_out_pair(module):
        fused = FusedGroupNorm(module.conv_norm_out, "silu", settings.tune)
        return [
            Change("module", "conv_norm_out", fused),
            Change("module", "conv_act", nn.Identity(), counted=False),
        ]
    return []


def _attention_processor_edits(module: nn.Module, settings: Settings) -> list[Change]:
    """An Attention module's AttnProcessor2_0 / AttnProcessor as FewstepAttnProcessor, on the
    kernel where the `attention` switch is on (else SDPA); one an earlier call left on SDPA,
    on the kernel now if the switch is on."""
    if _name(module) not in ATTENTION_CLASSES:
        return []
    processor = getattr(module, "processor", None)
    kernel = "attention" in settings.on
    replaceable = _name(processor) in REPLACEABLE_PROCESSORS
    upgrade = isinstance(processor, FewstepAttnProcessor) and kernel and not processor.kernel
    if not (replaceable or upgrade):
        return []
    new = FewstepAttnProcessor(kernel=kernel, tune=settings.tune)
    return [Change("processor", "processor", new)]


def _transformer_output_edits(module: nn.Module, settings: Settings) -> list[Change]:
    """A Transformer2DModel on continuous inputs, giving its output in its residual's
    layout (`_continuous_output_in_residual_layout`)."""
    if not (
        _name(module) in TRANSFORMER_CLASSES
        and getattr(module, "is_input_continuous", False)
        and hasattr(module, _TRANSFORMER_OUTPUT)
        and _TRANSFORMER_OUTPUT not in vars(module)
    ):
        return []
    bound = types.MethodType(_continuous_output_in_residual_layout, module)
    return [Change("method", _TRANSFORMER_OUTPUT, bound)]


# In the order they run: the fused blocks need their norms fused first.
REWRITES: tuple[Rewrite, ...] = (
    EditModule(
        "group_norm_silu",
        ("group_norm",),
        "GroupNorm → SiLU pairs now one fused op",
        _group_norm_silu_edits,
    ),
    SwapChild(
        "group_norm",
        ("group_norm",),
        "standalone GroupNorms now the kernel without activation",
        lambda module: isinstance(module, nn.GroupNorm),
        lambda norm, settings: FusedGroupNorm(norm, None, settings.tune),
    ),
    SwapChild(
        "resnet_blocks",
        ("group_norm",),
        "ResNet blocks now FusedResnetBlock",
        _runs_as_fused_block,
        lambda block, settings: FusedResnetBlock(block),
    ),
    EditModule(
        "attention",
        ("attention", PASSES),
        "attention processors now FewstepAttnProcessor",
        _attention_processor_edits,
    ),
    SwapChild(
        "geglu",
        ("geglu",),
        "GEGLU activations now FusedGEGLU",
        _geglu,
        lambda geglu, settings: FusedGEGLU(geglu, settings.tune),
    ),
    SwapChild(
        "layer_norm",
        ("layer_norm",),
        "LayerNorms now FusedLayerNorm",
        _layer_norm_over_one_dim,
        lambda norm, settings: FusedLayerNorm(norm, settings.tune),
    ),
    SwapChild(
        "upsample_conv",
        ("upsample_conv",),
        "upsample-then-convolve pairs now one transposed convolution",
        _fusable_upsample,
        lambda upsample, settings: FusedUpsampleConv(upsample, settings.tune),
    ),
    SwapChild(
        "pointwise_conv",
        ("pointwise_conv",),
        "1×1 convolutions now matrix products on channels_last inputs",
        _pointwise,
        lambda conv, settings: PointwiseConv(conv, settings.tune),
    ),
    EditModule(
        "transformer_outputs",
        (PASSES,),
        "Transformer2DModels now keeping their residual's layout",
        _transformer_output_edits,
    ),
)
# patch()'s keywords, and those that swap in a kernel (the rest drop passes)
SWITCHES = tuple(dict.fromkeys(switch for r in REWRITES for switch in r.switches))
KERNEL_NAMES = tuple(switch for switch in SWITCHES if switch != PASSES)


def _report_class() -> type:
    """A dataclass with one int field per rewrite, 0 by default, and `total`."""
    names = [r.name for r in REWRITES]
    if len(set(names)) != len(names):
        raise ValueError(f"REWRITES' names must differ, got {names}")
    report = dataclasses.make_dataclass(
        "PatchReport",
        [(name, int, dataclasses.field(default=0)) for name in names],
        namespace={"total": property(lambda self: sum(dataclasses.astuple(self)))},
    )
    report.__module__ = __name__
    report.__doc__ = "How many modules one `patch` call swapped, by rewrite:\n\n" + "\n".join(
        f"- {r.name}: {r.unit}" for r in REWRITES
    )
    return report


PatchReport = _report_class()


def _settings(kernels: Iterable[str] | None, switches: dict[str, Any], tune: bool) -> Settings:
    """The switches a `patch` call turns on: all by default; `kernels`, when given, turns
    off the kernels it does not name; a keyword sets its own switch."""
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise ValueError(
            f"patch() takes the switches {SWITCHES} (and kernels=, tune=), got {unknown}"
        )
    on = dict.fromkeys(SWITCHES, True)
    if kernels is not None:
        named = None if isinstance(kernels, str) else set(kernels)
        if named is None or not named <= set(KERNEL_NAMES):
            raise ValueError(f"kernels must be some of {KERNEL_NAMES}, got {kernels!r}")
        twice = sorted(set(switches) & set(KERNEL_NAMES))
        if twice:
            raise ValueError(f"kernels= and the keywords {twice} both say which kernels to use")
        on.update({name: name in named for name in KERNEL_NAMES})
    on.update({name: bool(value) for name, value in switches.items()})
    return Settings(frozenset(name for name, value in on.items() if value), bool(tune))


def _apply(record: list, owner: nn.Module, change: Change) -> None:
    """Make `change` to `owner`, recording how to undo it."""
    if change.kind == "processor":
        record.append(("processor", owner, change.attr, owner.processor))
        owner.set_processor(change.new)
    elif change.kind == "method":
        record.append(("method", owner, change.attr, None))
        object.__setattr__(owner, change.attr, change.new)
    else:
        record.append(("module", owner, change.attr, getattr(owner, change.attr)))
        setattr(owner, change.attr, change.new)


def patch(
    module: nn.Module,
    *,
    kernels: Iterable[str] | None = None,
    tune: bool = False,
    **switches: bool,
) -> tuple[nn.Module, Any]:  # (module, PatchReport)
    """Swap fewstep.kernels into a diffusers UNet2DConditionModel / AutoencoderKL, in place:
    each rewrite of REWRITES whose switch is on, in order, over the whole module.

    Switches (keywords, each True by default; SWITCHES):
    group_norm: fuse GroupNorm → SiLU pairs and swap the other GroupNorms.
    attention: AttnProcessor2_0 / AttnProcessor processors on the attention kernel.
    passes: drop passes that change no value (attention's division by 1, Transformer2D
    outputs' layout round trip), with `FewstepAttnProcessor` on SDPA where not `attention`.
    geglu: GEGLU activations on the fused kernel.
    layer_norm: LayerNorms over one dim on the kernel.
    upsample_conv: nearest ×2 upsamples and their 3×3 convolutions as one transposed
    convolution.
    pointwise_conv: 1×1 convolutions (SD1.5's transformer projections, ResNet shortcuts) on
    channels_last inputs as matrix products with their bias added by the GEMM.
    kernels: instead of the kernels' keywords, the kernels to swap in (some of
    KERNEL_NAMES; the others stay off).
    tune: each op this call swaps in times its kernel against torch's own at the first call
    of each shape on a CUDA GPU and keeps the faster (kernels/tuning.py); modules an
    earlier call swapped keep their setting.
    Returns (module, a PatchReport of what this call swapped). Calling it again swaps
    nothing. ValueError for an unknown switch or kernel name, before anything is swapped.
    """
    settings = _settings(kernels, switches, tune)
    record: list = getattr(module, _RECORD, [])
    counts = dict.fromkeys((r.name for r in REWRITES), 0)
    for rewrite in REWRITES:
        if settings.on.isdisjoint(rewrite.switches):
            continue
        for sub in list(module.modules()):
            changes = rewrite.changes(sub, settings)
            for change in changes:
                _apply(record, sub, change)
            counts[rewrite.name] += sum(change.counted for change in changes)
    if record:
        object.__setattr__(module, _RECORD, record)  # a plain attribute, not a submodule
    return module, PatchReport(**counts)


def unpatch(module: nn.Module) -> nn.Module:
    """Undo every `patch` of `module`: the original modules and processors are back."""
    record = getattr(module, _RECORD, [])
    for kind, owner, attr, original in reversed(record):
        if kind == "processor":
            owner.set_processor(original)
        elif kind == "method":
            object.__delattr__(owner, attr)  # the class's own method again
        else:
            setattr(owner, attr, original)
    if hasattr(module, _RECORD):
        object.__delattr__(module, _RECORD)
    return module


def is_patched(module: nn.Module) -> bool:
    return bool(getattr(module, _RECORD, None))
