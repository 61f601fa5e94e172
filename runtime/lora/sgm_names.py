"""kohya's SDXL U-Net names (Stability's original sgm layout) → diffusers module names.

kohya sd-scripts trains SDXL on Stability's own U-Net (`sgm`'s openaimodel.py), so its files
name U-Net modules the way that code does, with dots as underscores:

    sgm                               diffusers
    input_blocks.0.0                  conv_in
    input_blocks.i.0                  down_blocks.b.resnets.l        (a ResBlock)
    input_blocks.i.1                  down_blocks.b.attentions.l     (a SpatialTransformer)
    input_blocks.i.0.op               down_blocks.b.downsamplers.0.conv
    middle_block.0 / .1 / .2          mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.k.0 / .1            up_blocks.j.resnets.l / attentions.l
    output_blocks.k.{1|2}.conv        up_blocks.j.upsamplers.0.conv  (1 without attention)
    time_embed.0 / .2                 time_embedding.linear_1 / linear_2
    label_emb.0.0 / .0.2              add_embedding.linear_1 / linear_2
    out.2                             conv_out

Inside a ResBlock: in_layers.2 → conv1, out_layers.3 → conv2, emb_layers.1 → time_emb_proj,
skip_connection → conv_shortcut. Inside a SpatialTransformer the names are diffusers' own
(proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj, proj_out), kept as they are.

The block numbering follows from the U-Net's config, as sgm builds it: input_blocks counts
from 1 through each down block's `layers_per_block` ResBlocks, then its downsampler (every
block but the last); output_blocks counts through each up block's `layers_per_block + 1`
ResBlocks, the upsampler sharing the last one's index. So the table holds for any such U-Net
(the full-size SDXL with 2 layers per block, a tiny test model with 1), never for one size
only. diffusers reads the same names in `loaders/lora_conversion_utils.py`
(`_maybe_map_sgm_blocks_to_diffusers`, `_convert_unet_lora_key`).

Limits: U-Nets built from CrossAttnDownBlock2D / DownBlock2D, CrossAttnUpBlock2D / UpBlock2D
and a UNetMidBlock2DCrossAttn (or none), the blocks sgm has; for others `SgmNames` maps
nothing and says why. Norms (in_layers.0, out.0, …) are 1-D and take no LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SGM_ROOTS = (  # underscored, as kohya writes them
    "input_blocks_",
    "middle_block_",
    "output_blocks_",
    "time_embed_",
    "label_emb_",
    "out_",
)
_RESNET_LAYERS = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.2": "conv_out",
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type → has attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)


def looks_sgm(module: str) -> bool:
    """Whether an underscored U-Net module name starts like an sgm one."""
    return module.startswith(SGM_ROOTS)


class SgmNames:
    """The sgm → diffusers table of one U-Net config, for underscored (kohya) names.

    `modules`: {sgm module (dots): diffusers module (dots)} for whole modules (ResBlock
    layers, samplers, the top level); `blocks`: the same for SpatialTransformers, whose inner
    names are kept. `unsupported`: why nothing is mapped (a block sgm does not have), else None.
    """

    def __init__(self, config: Mapping[str, Any]):
        self.modules: dict[str, str] = {}
        self.blocks: dict[str, str] = {}
        self.counts = {"input_blocks": 0, "output_blocks": 0}  # sgm blocks numbered, for errors
        self.unsupported = _unsupported(config)
        if self.unsupported is None:
            self._build(config)
        self._modules_us = {_us(k): _us(v) for k, v in self.modules.items()}
        self._blocks_us = {_us(k): _us(v) for k, v in self.blocks.items()}

    def _resnet(self, sgm: str, diffusers: str) -> None:
        for layer, name in _RESNET_LAYERS.items():
            self.modules[f"{sgm}.{layer}"] = f"{diffusers}.{name}"

    def _build(self, config: Mapping[str, Any]) -> None:
        self.modules.update(_TOP_LEVEL)
        downs, ups = list(config["down_block_types"]), list(config["up_block_types"])
        layers = config["layers_per_block"]
        per_block = [int(layers)] * len(downs) if isinstance(layers, int) else list(layers)
        i = 1  # input_blocks.0 is conv_in
        for b, kind in enumerate(downs):
            for layer in range(per_block[b]):
                self._resnet(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{layer}")
                if _DOWN_TYPES[kind]:
                    self.blocks[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{layer}"
                i += 1
            if b < len(downs) - 1:
                self.modules[f"input_blocks.{i}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
                i += 1
        if _mid_type(config) == "UNetMidBlock2DCrossAttn":
            self._resnet("middle_block.0", "mid_block.resnets.0")
            self.blocks["middle_block.1"] = "mid_block.attentions.0"
            self._resnet("middle_block.2", "mid_block.resnets.1")
        k = 0
        for j, kind in enumerate(ups):
            count = per_block[len(ups) - 1 - j] + 1
            for layer in range(count):
                self._resnet(f"output_blocks.{k}.0", f"up_blocks.{j}.resnets.{layer}")
                if _UP_TYPES[kind]:
                    self.blocks[f"output_blocks.{k}.1"] = f"up_blocks.{j}.attentions.{layer}"
                if layer == count - 1 and j < len(ups) - 1:
                    sampler = 2 if _UP_TYPES[kind] else 1
                    self.modules[f"output_blocks.{k}.{sampler}.conv"] = (
                        f"up_blocks.{j}.upsamplers.0.conv"
                    )
                k += 1
        self.counts = {"input_blocks": i, "output_blocks": k}

    def translate(self, module: str) -> str | None:
        """An underscored sgm module name (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
        → the underscored diffusers one (`down_blocks_1_attentions_0_transformer_blocks_0_
        attn1_to_q`), left for the caller to resolve against real weight names; None when
        no sgm block of this U-Net starts it."""
        if module in self._modules_us:
            return self._modules_us[module]
        cut = module.rfind("_")
        while cut > 0:
            head = module[:cut]
            if head in self._blocks_us:
                return self._blocks_us[head] + module[cut:]
            cut = module.rfind("_", 0, cut)
        return None

    def describe(self) -> str:
        """What this U-Net's sgm names are, for an error message."""
        if self.unsupported is not None:
            return f"sgm block names are not mapped for this U-Net: {self.unsupported}"
        last_in, last_out = self.counts["input_blocks"] - 1, self.counts["output_blocks"] - 1
        mid = "middle_block_0…2, " if "middle_block.1" in self.blocks else ""
        return (
            f"this U-Net's sgm blocks are input_blocks_0…{last_in}, {mid}"
            f"output_blocks_0…{last_out}; attention blocks: "
            f"{', '.join(_us(k) for k in self.blocks) or 'none'}"
        )


def _us(name: str) -> str:
    return name.replace(".", "_")


def _unsupported(config: Mapping[str, Any]) -> str | None:
    """Why the config's U-Net has no sgm layout (None: it has one)."""
    downs, ups = config.get("down_block_types"), config.get("up_block_types")
    if not isinstance(downs, list | tuple) or not isinstance(ups, list | tuple):
        return "its config lists no down_block_types and up_block_types"
    odd = [t for t in downs if not (isinstance(t, str) and t in _DOWN_TYPES)]
    odd += [t for t in ups if not (isinstance(t, str) and t in _UP_TYPES)]
    if _mid_type(config) not in _MID_TYPES:
        odd.append(_mid_type(config))
    if odd:
        return f"block types {', '.join(map(str, odd))} have no sgm counterpart"
    if len(downs) != len(ups):
        return f"{len(downs)} down blocks but {len(ups)} up blocks"
    layers = config.get("layers_per_block")
    counts = [layers] * len(downs) if isinstance(layers, int) else layers
    if not (
        isinstance(counts, list | tuple)
        and len(counts) == len(downs)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts)
    ):
        return f"layers_per_block {layers!r:.80} does not fit {len(downs)} down blocks"
    return None


def _mid_type(config: Mapping[str, Any]) -> Any:
    return config.get("mid_block_type", "UNetMidBlock2DCrossAttn")  # diffusers' default
