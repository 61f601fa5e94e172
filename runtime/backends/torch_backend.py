"""torch backend: the source diffusers modules in-process, behind the graphs' contract.

`TorchBackend(folder)` loads a diffusers folder's text encoder (transformers
CLIPTextModel), U-Net and VAE (diffusers) and runs them as the graphs `text_encoder`,
`unet`, `vae_decoder`, `vae_encoder` with optimum's input and output names
(fewstep/export/graphs.py defines the same contract for ONNX), so the one pipeline and its
samplers drive it like any backend. Arrays are torch tensors on the model's device: float32
in and out (as onnxruntime's fp16 packages), the modules' own precision inside.

SDXL (a U-Net with `addition_embed_type="text_time"`), as its ONNX export: the second text
encoder (transformers CLIPTextModelWithProjection) is the graph `text_encoder_2`, outputs
`text_embeds`, `last_hidden_state`; both encoders add `hidden_states.0` … `hidden_states.L`
(the embeddings, then each of their L layers, before the final layer norm); the U-Net takes
`text_embeds` and `time_ids` after `encoder_hidden_states` (`timestep_cond` after those when
it has one), in the U-Net's precision as diffusers' SDXL pipelines pass them.

On a CUDA device, by default:
- fp16 (`dtype`), except the VAE when fp16 overflows in it: the rule of the exporter's
  `keeps_fp32_vae_decoder` and of diffusers' SDXL pipelines (`force_upcast`, SDXL family),
  so SD 1.x/2.x VAEs run in fp16 as in diffusers' SD pipelines;
- channels_last U-Net and VAE;
- cuDNN picks each convolution's algorithm by timing it once per shape (`cudnn.benchmark`,
  set during this backend's calls only and restored after: its shapes are static);
- fewstep.kernels swapped in (`fewstep.kernels.patch`, which also drops passes that change
  no value), each op keeping per shape the faster of its kernel and torch's own, timed on
  the device at its first call (`kernels="auto"`, see DEFAULT_CUDA_KERNELS);
- the text encoders, the U-Net step and the VAE decoder captured as CUDA graphs, one per
  static input signature (shapes and dtypes), on first use: two warm-up runs on a side
  stream, then the capture, checked once against the eager warm-up; later calls copy into
  the static inputs, replay and copy the output out. All graphs share one memory pool and a
  lock (they are replayed one at a time). A module that cannot be captured runs eagerly,
  with a warning. Capture time is recorded in `capture_ms`, outside any per-step timing
  after the first call.
On the CPU the defaults are fp32, no CUDA graphs and no kernels: the Triton kernels run on
the CPU only in Triton's interpreter (TRITON_INTERPRET=1, for tests); `kernels=True`
without it logs that and runs torch's ops. With `kernels=False, cuda_graphs=False` this
backend is plain "diffusers eager" (SDPA attention), the baseline of benchmarks.
`compile=True` adds torch.compile (Inductor) of the U-Net and VAE decoder under the same
CUDA graphs: the fastest U-Net step measured, ahead of torch.compile's own reduce-overhead
mode (docs/reference.md#torch-backend-on-the-h200), at the cost of a compile per shape on
first use (tens of seconds for an SD U-Net).

`vae=`: a tiny autoencoder folder (diffusers' AutoencoderTiny: TAESD) loaded in place of the
folder's own VAE, checked first (fewstep.package.check_tiny_vae_folder); its `vae_encoder`
returns `latents` (the exported graph's name), not a distribution.

Limits: no SDXL refiner (no first text encoder; aesthetic-score time ids): `verify_model`
refuses its folder for lacking `text_encoder/`. Weights load from safetensors only (pickle
runs code; see fewstep.export.source). Inference only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.backends.base import BackendError, BackendReport, describe_inputs, missing_extra_error
from fewstep.package import (
    read_json,
    read_model_info,
    verify_diffusers_folder,
)

logger = logging.getLogger(__name__)

DEVICE_TYPES = ("cpu", "cuda")
# Accepted spellings of each precision; the keys are the canonical names.
DTYPE_NAMES = {
    "fp32": ("fp32", "float32", "float"),
    "fp16": ("fp16", "float16", "half"),
    "bf16": ("bf16", "bfloat16"),
    "fp64": ("fp64", "float64", "double"),  # a reference precision, for tests
}
# Inputs of each graph, in the ONNX order (optimum's names; fewstep/export/graphs.py). The
# U-Net takes the ones its config calls for (`unet_inputs`).
GRAPH_INPUTS = {
    "text_encoder": ("input_ids",),
    "text_encoder_2": ("input_ids",),  # SDXL only
    "unet": ("sample", "timestep", "encoder_hidden_states", "timestep_cond"),
    "vae_decoder": ("latent_sample",),
    "vae_encoder": ("sample",),
}
SDXL_UNET_CONDITIONING = ("text_embeds", "time_ids")  # after encoder_hidden_states
OPTIONAL_INPUTS = ("timestep_cond",)
# The one output of each single-output graph (the text encoder returns two).
OUTPUT_NAMES = {"unet": "out_sample", "vae_decoder": "sample", "vae_encoder": "latent_parameters"}
CUDA_GRAPH_WARMUP_RUNS = 2
# A replay of the warm-up inputs against the eager warm-up: the same kernels on the same data,
# so only a capture that went wrong differs by more than fp16 rounding.
CUDA_GRAPH_CHECK_TOLERANCE = 1e-2


def is_sdxl(unet_config: dict[str, Any]) -> bool:
    """Whether the U-Net takes SDXL's added conditioning (text_embeds, time_ids)."""
    return unet_config.get("addition_embed_type") == "text_time"


def unet_inputs(unet_config: dict[str, Any]) -> tuple[str, ...]:
    """The U-Net graph's inputs in the ONNX order (fewstep.export.graphs.unet_spec):
    sample, timestep, encoder_hidden_states, [text_embeds, time_ids], [timestep_cond]."""
    names = GRAPH_INPUTS["unet"][:3]
    if is_sdxl(unet_config):
        names += SDXL_UNET_CONDITIONING
    if unet_config.get("time_cond_proj_dim"):
        names += ("timestep_cond",)
    return names


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise missing_extra_error("torch", "torch") from e
    return torch


def parse_device(device: Any) -> Any:
    """A torch.device of a type in DEVICE_TYPES, usable here; ValueError naming `device`.

    None: the GPU when torch sees one, else the CPU."""
    torch = _torch()
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device must be one of {DEVICE_TYPES} (or 'cuda:N'), got {device!r}"
        ) from e
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device must be one of {DEVICE_TYPES} (or 'cuda:N'), got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return dev


def parse_dtype(dtype: Any, device: Any) -> Any:
    """A torch dtype from a name in DTYPE_NAMES or a torch dtype; None: fp16 on CUDA, else fp32."""
    torch = _torch()
    by_name = {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp64": torch.float64,
    }
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in by_name.values():
        return dtype
    if isinstance(dtype, str):
        for canonical, spellings in DTYPE_NAMES.items():
            if dtype.lower() in spellings:
                return by_name[canonical]
    raise ValueError(
        f"dtype must be one of {tuple(DTYPE_NAMES)} (or the torch dtype), got {dtype!r}"
    )


KERNEL_NAMES = ("group_norm", "attention", "geglu", "layer_norm", "upsample_conv", "pointwise_conv")
# On CUDA by default: every kernel, each op keeping per shape the faster of the kernel and
# torch's own, timed at its first call (fewstep.kernels.tuning). Which wins depends on the
# card and the shape: on an H200 the fused GroupNorm+SiLU made the SD1.5 U-Net step faster
# and the attention kernel made it slower, cuDNN's SDPA being faster at head dim 40
# (docs/reference.md#torch-backend-on-the-h200); tuned attention also times SDPA on each of
# its backends, since torch's own pick is not always the fastest. Where nothing can be timed,
# each op takes the measured-faster or conservative path: the GroupNorm kernel, SDPA, torch's
# GEGLU and LayerNorm, diffusers' upsampling, cuDNN's 1×1 convolutions. The first call of each
# shape pays for it: every candidate compiles (Triton keeps them on disk) and is timed, inside
# the warm-up before the CUDA graph capture (in `capture_ms`).
DEFAULT_CUDA_KERNELS = "auto"


def parse_kernels(kernels: Any) -> tuple[str, ...] | str | None:
    """None (the device's default), "auto", or the kernels to use: True = all, False = none."""
    if kernels is None or kernels == "auto":
        return kernels
    if isinstance(kernels, bool):
        return KERNEL_NAMES if kernels else ()
    if isinstance(kernels, (tuple, list)) and all(k in KERNEL_NAMES for k in kernels):
        return tuple(k for k in KERNEL_NAMES if k in kernels)
    raise ValueError(
        f"kernels must be True, False, 'auto' or some of {KERNEL_NAMES}, got {kernels!r}"
    )


def diffusers_dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """`from_pretrained`'s dtype argument: `dtype` where diffusers has it (it deprecated
    `torch_dtype` in favour of it, huggingface/diffusers#14205), else `torch_dtype`."""
    import diffusers.utils.deprecation_utils as deprecation

    return {"dtype": dtype} if hasattr(deprecation, "_resolve_dtype") else {"torch_dtype": dtype}


class TorchArrayOps:
    """fewstep.arrays' operations on torch tensors on one device (float32 latents)."""

    def __init__(self, device: Any):
        self._torch = _torch()
        self.device = device

    def asarray(self, array: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def float32(self, x: Any) -> Any:
        return x.float()

    def concat(self, xs: Any) -> Any:
        return self._torch.cat(list(xs))

    def repeat(self, x: Any, repeats: int) -> Any:
        return x if repeats == 1 else x.repeat_interleave(repeats, dim=0)

    def std(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.std(dim=axes, keepdim=True, correction=1)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def all_finite(self, x: Any) -> bool:
        return bool(self._torch.isfinite(x).all())

    def to_host(self, x: Any) -> np.ndarray:
        return x.float().cpu().numpy()

    def to_images(self, decoded: Any, as_uint8: bool) -> np.ndarray:
        # On the device, transposition included: the host copies out finished images.
        images = (decoded.float() / 2 + 0.5).clamp_(0.0, 1.0)
        if as_uint8:
            images = images.mul_(255).round_().to(self._torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [B, H, W, 3]


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Any:
    """torch.backends.cudnn.benchmark on inside when `enabled` (else left alone), the caller's
    value restored after."""
    cudnn = _torch().backends.cudnn
    before = cudnn.benchmark
    cudnn.benchmark = before or enabled
    try:
        yield
    finally:
        cudnn.benchmark = before


class TorchBackend:
    name = "torch"

    @staticmethod
    def verify_model(root: Path, check_hashes: bool = True) -> None:
        """The diffusers folder whose modules it runs (no manifest: no hashes to check)."""
        verify_diffusers_folder(root)

    def __init__(
        self,
        package_dir: str | Path,
        device: Any = None,
        dtype: Any = None,
        kernels: bool | str | None | tuple[str, ...] | list[str] = None,
        cuda_graphs: bool = True,
        channels_last: bool = True,
        compile: bool = False,
        vae: str | Path | None = None,
    ):
        """package_dir: a diffusers folder (model_index.json, unet/, vae/, text_encoder/;
        SDXL: text_encoder_2/ too).

        device: "cpu", "cuda" or "cuda:N"; None: CUDA when torch sees a GPU, else the CPU.
        dtype: "fp32" | "fp16" | "bf16" | "fp64" (or the torch dtype; fp64 is a reference
        precision); None: fp16 on CUDA, fp32 on the CPU.
        kernels: swap in fewstep.kernels (True: all; or some of KERNEL_NAMES); "auto": all,
        each op keeping per shape the faster of its kernel and torch's own, timed at its
        first call; None: DEFAULT_CUDA_KERNELS ("auto") on CUDA, none on the CPU.
        cuda_graphs: capture the text encoders, U-Net step and VAE decoder (CUDA only).
        channels_last: U-Net and VAE in channels_last. compile: torch.compile the U-Net and
        the VAE decoder (Inductor fuses the elementwise work around convs and matmuls; the
        kernels are custom ops it keeps; the first call of each shape compiles, before any
        CUDA graph capture). vae: a diffusers AutoencoderTiny folder (TAESD) to run as the
        VAE decoder and encoder instead of the folder's own VAE.
        """
        # Arguments first: a bad value is an error before anything loads.
        self._set_options(device, dtype, kernels, cuda_graphs, channels_last, compile)
        self.root = Path(package_dir)
        self.tiny_vae = None if vae is None else Path(vae)
        if self.tiny_vae is not None:
            read_model_info(self.root, vae=self.tiny_vae)  # checks the folder against the model
        self._outputs = dict(OUTPUT_NAMES)
        if self.tiny_vae is not None:
            self._outputs["vae_encoder"] = "latents"
        self.array_ops = TorchArrayOps(self.device)
        unet_config = read_json(self.root / "unet" / "config.json")
        self.sdxl = is_sdxl(unet_config)
        t0 = time.perf_counter()
        self._load_modules(unet_config)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.patch_report = self._patch_kernels()
        self._set_calls(compile)
        self._set_up_graphs(unet_config)

    # -- setup ---------------------------------------------------------------------------

    def _set_options(
        self,
        device: Any,
        dtype: Any,
        kernels: Any,
        cuda_graphs: Any,
        channels_last: Any,
        compile: Any,
    ) -> None:
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        for name, value in (
            ("cuda_graphs", cuda_graphs),
            ("channels_last", channels_last),
            ("compile", compile),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        names = parse_kernels(kernels)
        cuda = self.device.type == "cuda"
        if names is None:
            names = DEFAULT_CUDA_KERNELS if cuda else ()
        self.tune_kernels = isinstance(names, str)  # "auto": each kernel timed against torch's
        names = KERNEL_NAMES if isinstance(names, str) else names
        self.kernels = self._resolve_kernels(names, cuda)
        self.cuda_graphs = bool(cuda_graphs) and cuda
        if cuda_graphs and not cuda:
            logger.debug("cuda_graphs applies to CUDA devices only; running eagerly on %s", device)
        self.channels_last = bool(channels_last)

    def _load_modules(self, unet_config: dict[str, Any]) -> None:
        """The text encoder(s), U-Net and VAE, in their precision, layout and device."""
        torch = _torch()
        if self.sdxl:
            read_json(self.root / "text_encoder_2" / "config.json")  # PackageError naming it
        try:
            import diffusers
            import transformers
        except ImportError as e:
            raise missing_extra_error(e.name or "diffusers", "torch") from e
        self.vae_dtype = self.dtype
        vae_folder = self.root / "vae" if self.tiny_vae is None else self.tiny_vae
        vae_config = read_json(vae_folder / "config.json")
        if self.dtype == torch.float16 and self._vae_overflows_in_fp16(unet_config, vae_config):
            self.vae_dtype = torch.float32
            logger.info("VAE kept in fp32: force_upcast is set and it overflows in fp16")
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.text_encoder = self._prepare(
            transformers.CLIPTextModel.from_pretrained(
                self.root / "text_encoder", use_safetensors=True
            ),
            self.dtype,
        )
        self.text_encoder_2 = None
        if self.sdxl:
            self.text_encoder_2 = self._prepare(
                transformers.CLIPTextModelWithProjection.from_pretrained(
                    self.root / "text_encoder_2", use_safetensors=True
                ),
                self.dtype,
            )
        # diffusers casts at load so that modules it keeps in fp32 stay so.
        self.unet = self._prepare(
            diffusers.UNet2DConditionModel.from_pretrained(
                self.root / "unet", use_safetensors=True, **diffusers_dtype_kwargs(self.dtype)
            ),
            self.dtype,
            memory_format,
        )
        vae_class = diffusers.AutoencoderKL if self.tiny_vae is None else diffusers.AutoencoderTiny
        self.vae = self._prepare(
            vae_class.from_pretrained(
                vae_folder, use_safetensors=True, **diffusers_dtype_kwargs(self.vae_dtype)
            ),
            self.vae_dtype,
            memory_format,
        )

    def _patch_kernels(self) -> dict[str, Any]:
        """Swap fewstep.kernels into the U-Net and VAE; the patch report per module."""
        report: dict[str, Any] = {}
        if self.kernels:
            from fewstep.kernels import patch

            for name in ("unet", "vae"):
                _, module_report = patch(
                    getattr(self, name), kernels=self.kernels, tune=self.tune_kernels
                )
                report[name] = module_report
            logger.info("fewstep.kernels patched in: %s", report)
        return report

    def _set_calls(self, compile: bool) -> None:
        torch = _torch()
        if compile:
            # The modules stay as they are (LoRA folding and reports reach their weights);
            # only the calls go through the compiled forwards.
            self._unet_call = torch.compile(self.unet, dynamic=False)
            self._vae_decode_call = torch.compile(self.vae.decode, dynamic=False)
        else:
            self._unet_call = self.unet
            self._vae_decode_call = self.vae.decode

    def _set_up_graphs(self, unet_config: dict[str, Any]) -> None:
        """CUDA graph state: one graph per module and input signature, made on first use."""
        self._graphs: dict[tuple, Any] = {}  # (graph, signature) -> GraphedCall
        self.capture_ms: dict[str, float] = {}  # per captured signature, for reports
        self._graph_lock = threading.Lock()
        self._pool: Any = None  # one memory pool for all graphs, made at the first capture
        self._forward: dict[str, Callable[..., Any]] = {
            "text_encoder": self._text_encoder,
            "unet": self._unet,
            "vae_decoder": self._vae_decoder,
            "vae_encoder": self._vae_encoder,
        }
        if self.sdxl:
            self._forward["text_encoder_2"] = self._text_encoder_2
        # Each captured per input signature; the text encoders too: eagerly, their hundreds
        # of small launches make them host-bound, as slow at batch 1 as at batch 8
        # (docs/reference.md#torch-backend-on-the-h200).
        captured = {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
        self._captured = captured & set(self._forward) if self.cuda_graphs else set()
        self._unet_inputs = unet_inputs(unet_config)

    def _resolve_kernels(self, kernels: tuple[str, ...], cuda: bool) -> tuple[str, ...]:
        """The kernels to patch in: on the CPU, none unless Triton's interpreter runs."""
        if not kernels:
            return ()
        try:  # triton comes with torch's CUDA wheels; on the CPU, with the dev extra
            from fewstep.kernels._interpreter import INTERPRETED
        except ImportError as e:
            raise missing_extra_error(e.name or "triton", "dev") from e
        if cuda:
            return kernels
        if not INTERPRETED:
            logger.warning(
                "kernels=True on the CPU: the Triton kernels run on the CPU only in Triton's "
                "interpreter (TRITON_INTERPRET=1 before import, for tests); using torch's ops"
            )
            return ()
        logger.info("kernels=True on the CPU: the Triton kernels run in the interpreter (slow)")
        return kernels

    @staticmethod
    def _vae_overflows_in_fp16(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> bool:
        # fewstep.export.graphs.keeps_fp32_vae_decoder: SDXL VAEs with force_upcast (the
        # AutoencoderKL default) overflow in fp16; SD 1.x/2.x VAEs carry the flag too (by
        # default) and run in fp16 in diffusers' SD pipelines.
        return is_sdxl(unet_config) and bool(vae_config.get("force_upcast", True))

    def _prepare(self, module: Any, dtype: Any, memory_format: Any = None) -> Any:
        if getattr(module, "dtype", None) != dtype:
            module = module.to(dtype=dtype)
        module = module.to(device=self.device).eval().requires_grad_(False)
        if memory_format is not None:
            module = module.to(memory_format=memory_format)
        return module

    # -- the graphs ----------------------------------------------------------------------

    def _text_encoder(self, input_ids: Any) -> dict[str, Any]:
        out = self.text_encoder(
            input_ids=input_ids, output_hidden_states=self.sdxl, return_dict=True
        )
        return {
            "last_hidden_state": out.last_hidden_state.float(),  # [B, S, H]
            "pooler_output": out.pooler_output.float(),  # [B, H]
            **self._hidden_states(out),
        }

    def _text_encoder_2(self, input_ids: Any) -> dict[str, Any]:
        """SDXL's CLIPTextModelWithProjection, in the export's output order."""
        assert self.text_encoder_2 is not None  # the graph exists for SDXL only
        out = self.text_encoder_2(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return {
            "text_embeds": out.text_embeds.float(),  # [B, P]: pooled, projected
            "last_hidden_state": out.last_hidden_state.float(),  # [B, S, H]
            **self._hidden_states(out),
        }

    def _hidden_states(self, out: Any) -> dict[str, Any]:
        """SDXL: `hidden_states.0` … `.L` [B, S, H], the embeddings then each layer's output
        (the last one before the final layer norm), as optimum's SDXL export names them."""
        if not self.sdxl:
            return {}
        return {f"hidden_states.{i}": h.float() for i, h in enumerate(out.hidden_states)}

    def _unet(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        text_embeds: Any = None,
        time_ids: Any = None,
        timestep_cond: Any = None,
    ) -> Any:
        torch = _torch()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        sample = sample.to(self.dtype).contiguous(memory_format=memory_format)  # [B, C, h, w]
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(self.dtype)
        added = None
        if self.sdxl:  # run() has checked that both are given
            added = {"text_embeds": text_embeds.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        out = self._unet_call(
            sample,
            timestep,  # [] float32: the sinusoidal embedding is computed in float32
            encoder_hidden_states.to(self.dtype),
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return out.to(torch.float32, memory_format=torch.contiguous_format)

    def _vae_decoder(self, latent_sample: Any) -> Any:
        torch = _torch()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        z = latent_sample.to(self.vae_dtype).contiguous(memory_format=memory_format)
        out = self._vae_decode_call(z, return_dict=False)[0]  # [B, 3, H, W]
        return out.to(torch.float32, memory_format=torch.contiguous_format)

    def _vae_encoder(self, sample: Any) -> Any:
        torch = _torch()
        x = sample.to(self.vae_dtype)
        moments = self.vae.encoder(x)  # AutoencoderTiny: the latents [B, C, h, w]
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        return moments.to(torch.float32, memory_format=torch.contiguous_format)  # [B, 2C, h, w]

    # -- the contract --------------------------------------------------------------------

    def report(self) -> BackendReport:
        return BackendReport(
            self.name,
            load_ms=self.load_ms,
            captures_ms=dict(self.capture_ms),
            details={"kernels": list(self.kernels), "patch_report": self.patch_report},
        )

    def has_graph(self, graph: str) -> bool:
        return graph in self._forward

    def input_names(self, graph: str) -> list[str]:
        self._check_graph(graph)
        if graph == "unet":
            return list(self._unet_inputs)
        return list(GRAPH_INPUTS[graph])

    def _check_graph(self, graph: str) -> None:
        """ValueError naming `graph` when it is none of this model's graphs."""
        if graph not in self._forward:
            sdxl_only = " (text_encoder_2 is SDXL's)" if graph == "text_encoder_2" else ""
            raise ValueError(
                f"graph must be one of this model's graphs {tuple(self._forward)}, got "
                f"{graph!r}{sdxl_only}"
            )

    def _to_tensor(self, graph: str, name: str, value: Any) -> Any:
        torch = _torch()
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        if t.is_floating_point():
            t = t.to(torch.float32)
        elif name == "input_ids":
            t = t.to(torch.int64)
        else:
            raise BackendError(f"{graph} input {name!r} must be a float array, got {t.dtype}")
        return t.to(self.device)

    def run(self, graph: str, **inputs: Any) -> dict[str, Any]:
        torch = _torch()
        accepted = self.input_names(graph)
        unknown = [name for name in inputs if name not in accepted]
        missing = [n for n in accepted if n not in inputs and n not in OPTIONAL_INPUTS]
        if unknown or missing:
            raise BackendError(
                f"{graph} takes inputs {accepted}, got {list(inputs)} "
                f"(unknown {unknown}, missing {missing})"
            )
        try:
            with torch.inference_mode(), cudnn_benchmark(self.device.type == "cuda"):
                tensors = {n: self._to_tensor(graph, n, v) for n, v in inputs.items()}
                if graph in self._captured:
                    out = self._replay(graph, tensors)
                else:
                    out = self._forward[graph](**tensors)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"{graph} failed on inputs {describe_inputs(inputs)}: {e}") from e
        return out if isinstance(out, dict) else {self._outputs[graph]: out}

    def _replay(self, graph: str, tensors: dict[str, Any]) -> Any:
        from fewstep.cuda_graphs import GraphedCall, signature

        key = (graph, signature(tensors))
        with self._graph_lock, _torch().cuda.device(self.device):
            runner = self._graphs.get(key)
            if runner is None:
                t0 = time.perf_counter()
                if self._pool is None:
                    self._pool = _torch().cuda.graph_pool_handle()
                try:
                    runner = GraphedCall(
                        self._forward[graph],
                        tensors,
                        self._pool,
                        warmup=CUDA_GRAPH_WARMUP_RUNS,
                        tolerance=CUDA_GRAPH_CHECK_TOLERANCE,
                    )
                except Exception as e:  # e.g. a host sync inside the module: run it eagerly
                    logger.warning("%s runs without a CUDA graph: capture failed (%s)", graph, e)
                    self._captured.discard(graph)
                    return self._forward[graph](**tensors)
                _torch().cuda.synchronize(self.device)
                label = f"{graph} " + describe_inputs(tensors)
                self.capture_ms[label] = (time.perf_counter() - t0) * 1e3
                logger.info(
                    "captured a CUDA graph for %s in %.0f ms", label, self.capture_ms[label]
                )
                self._graphs[key] = runner
            return runner(tensors)
