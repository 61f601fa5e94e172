"""Text-to-image pipeline: prompt → tokens → text encoder → sampler loop → VAE decode.

Follows diffusers' `StableDiffusionPipeline.__call__` and
`LatentConsistencyModelPipeline.__call__` (src/diffusers/pipelines/…) step for
step, so that the same weights, initial latents and noise give the same images; for SDXL,
`StableDiffusionXLPipeline.__call__`, whose text conditioning is fewstep.prompt_sdxl's; with an
input image, their img2img pipelines (`StableDiffusionImg2ImgPipeline`,
`StableDiffusionXLImg2ImgPipeline`, …).
Deviations: the safety checker is not part of the package; a non-finite image is an error,
never an output.

A `Pipeline` holds only immutable model state (configs, tokenizer, backend
sessions); everything that belongs to one call lives in that call, so one
pipeline can serve several threads.

Arrays stay the backend's kind (numpy, or torch tensors on the device) from the text
encoder to the VAE; the few operations beyond arithmetic and slicing go through the
backend's `array_ops` (fewstep.arrays). Noise is drawn on the host from numpy's
generator, so a seed gives the same image on every backend.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.arrays import NUMPY_OPS, ArrayOps
from fewstep.backends.base import Backend, backend_class, check_options
from fewstep.image_inputs import ImageInput, sample_image_latents, scaled_image_latents
from fewstep.inputs import Limits, NoiseSource, check_inputs
from fewstep.package import TINY_VAE_CLASS, ModelInfo, read_model_info
from fewstep.prompt_sdxl import SDXLTextEncoders, refuse_sdxl_arguments
from fewstep.samplers import SAMPLERS, create_sampler, sampler_name_for
from fewstep.samplers.lcm import guidance_scale_embedding
from fewstep.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineOutput:
    images: Any  # list of PIL images, or float32 array [B, H, W, 3] in 0..1
    seed: int | list[int] | None  # the seed(s) the noise came from (None for generators)
    timings_ms: dict[str, Any]  # total; with timings=True also each stage's (see __call__)
    settings: dict[str, Any]  # the resolved arguments, for metadata and logs


def rescale_noise_cfg(
    noise_cfg: Any, noise_cond: Any, rescale: float, ops: ArrayOps = NUMPY_OPS
) -> Any:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules…", sec. 3.4)."""
    axes = tuple(range(1, noise_cond.ndim))
    std_cond = ops.std(noise_cond, axes)
    std_cfg = ops.std(noise_cfg, axes)
    rescaled = noise_cfg * (std_cond / std_cfg)
    return rescale * rescaled + (1.0 - rescale) * noise_cfg


def noise_drawer(source: Any) -> Any:
    """draw(shape) → float32 standard normal noise [B, …] from `source`: a seed or a
    generator for the whole batch, or a tuple of them, one per image (each draws its own
    rows, so an image's noise does not depend on the other images of the batch)."""
    if not isinstance(source, tuple):
        rng = np.random.default_rng(source) if isinstance(source, (int, np.integer)) else source
        return lambda shape: rng.standard_normal(shape, dtype=np.float32)
    rngs = [np.random.default_rng(s) if isinstance(s, (int, np.integer)) else s for s in source]
    return lambda shape: np.concatenate(
        [rng.standard_normal((1, *shape[1:]), dtype=np.float32) for rng in rngs]
    )


def _no_sync() -> None:
    pass


def numpy_to_pil(images: np.ndarray) -> list[Any]:
    """uint8 images [B, H, W, 3] → PIL images."""
    from PIL import Image

    return [Image.fromarray(img) for img in images]


class Pipeline:
    def __init__(
        self,
        info: ModelInfo,
        tokenizer: CLIPTokenizer,
        backend: Backend,
        path: Path,
        limits: Limits | None = None,
        sdxl: SDXLTextEncoders | None = None,
    ):
        self.info = info
        self.tokenizer = tokenizer
        self.backend = backend
        self.path = path
        # SDXL's second tokenizer and conditioning settings (read from `path` when not given)
        if sdxl is None and info.family == "sdxl":
            sdxl = SDXLTextEncoders.from_folder(path)
        self.sdxl = sdxl
        self.limits = Limits() if limits is None else limits
        if not isinstance(self.limits, Limits):
            raise ValueError(f"limits must be a fewstep.Limits, got {limits!r}")

    @classmethod
    def from_pretrained(
        cls,
        package: str | Path,
        backend: str = "onnxruntime",
        check_hashes: bool = True,
        limits: Limits | None = None,
        **backend_options: Any,
    ) -> Pipeline:
        """Load a model onto a backend: a model package (fewstep's or optimum's) for
        onnxruntime and openvino, the diffusers folder itself for torch.

        The folder is checked first (with `check_hashes`, every file against fewstep.json),
        then its configs and tokenizer are read, and only then is the backend built, so a bad
        folder fails before any session or module loads. `limits` bound what one call may ask
        for (fewstep.Limits: pixels, images, steps, prompt length). Other keywords are the
        backend's options (`providers=` for onnxruntime, `precision=` for openvino, `device=`
        for torch, `loras=` …); one it does not take is a ValueError naming it.
        """
        root = Path(package)
        backend_cls = backend_class(backend)
        check_options(backend, backend_cls, backend_options)
        if limits is not None and not isinstance(limits, Limits):
            raise ValueError(f"limits must be a fewstep.Limits, got {limits!r}")
        backend_cls.verify_model(root, check_hashes=check_hashes)
        # torch's `vae=`: a tiny autoencoder folder in place of the folder's own VAE
        info = read_model_info(root, vae=backend_options.get("vae"))
        tokenizer = CLIPTokenizer.from_folder(root / "tokenizer")
        sdxl = SDXLTextEncoders.from_folder(root) if info.family == "sdxl" else None
        return cls(info, tokenizer, backend_cls(root, **backend_options), root, limits, sdxl)

    # -- stages ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str]) -> Any:
        """Prompts → text encoder hidden states [len(prompts), 77, C] (a backend array)."""
        ids = self.tokenizer(prompts)
        return self.backend.run("text_encoder", input_ids=ids)["last_hidden_state"]

    def unet(self, sample: Any, timestep: float, cond: dict[str, Any]) -> Any:
        out = self.backend.run(
            "unet", sample=sample, timestep=np.array(timestep, dtype=np.float32), **cond
        )
        return out["out_sample"]

    def decode(self, latents: Any, as_uint8: bool = False) -> np.ndarray:
        """Latents [B, C, h, w] (a backend array) → host images [B, H, W, 3]: float32 in
        0..1, or uint8 with `as_uint8`."""
        ops = self.backend.array_ops
        scaled = ops.float32(latents / self.info.vae_scaling_factor)
        decoded = self.backend.run("vae_decoder", latent_sample=scaled)["sample"]
        if not ops.all_finite(decoded):
            raise FloatingPointError(
                "vae_decoder produced non-finite values (an fp16 VAE overflows on some "
                "models; export the VAE in fp32)"
            )
        return ops.to_images(decoded, as_uint8)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Images [N, 3, H, W] in -1..1 → the VAE encoder's output, on the host: float32
        [N, 2C, H/f, W/f], the latent distribution's mean then log-variance (AutoencoderKL),
        or the latents [N, C, H/f, W/f] themselves (AutoencoderTiny)."""
        ops = self.backend.array_ops
        name = "latents" if self.info.vae_class == TINY_VAE_CLASS else "latent_parameters"
        out = self.backend.run("vae_encoder", sample=ops.asarray(pixels))[name]
        if not ops.all_finite(out):
            raise FloatingPointError(
                "vae_encoder produced non-finite values (an fp16 VAE overflows on some models; "
                "export the VAE in fp32)"
            )
        return ops.to_host(out)

    def check_image_encoder(self) -> None:
        """ValueError naming the graph when the model has no VAE encoder (img2img needs it)."""
        if not self.backend.has_graph("vae_encoder"):
            raise ValueError(
                f"image (img2img) needs the model's VAE encoder, and {self.path} has no "
                "vae_encoder graph (vae_encoder/model.onnx); export the model with "
                "`fewstep export` to include it"
            )

    def image_latents(
        self, image: ImageInput, sampler: Any, draw: Any, per_image: bool
    ) -> np.ndarray:
        """img2img's initial latents on the host, float32 [B, C, h, w]: the images' latents
        (a sample of the encoder's distribution) noised to the sampler's first timestep, as
        diffusers' img2img `prepare_latents` (the sample's noise first, then the added
        noise, from the same source). A tiny autoencoder's latents are not sampled: no noise
        is drawn for them, as diffusers' `retrieve_latents` draws none."""
        encoded = self.encode_image(image.pixels)
        scaling = self.info.vae_scaling_factor
        if self.info.vae_class == TINY_VAE_CLASS:
            clean = scaled_image_latents(encoded, image.rows, scaling)
        else:
            clean = sample_image_latents(encoded, image.rows, draw, per_image, scaling)
        noisy = sampler.add_noise(clean, draw(clean.shape), sampler.begin_index)
        return np.asarray(noisy, dtype=np.float32)

    # -- the call -------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: NoiseSource | Sequence[NoiseSource] | None = None,
        latents: np.ndarray | None = None,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        scheduler: str | None = None,
        progress: bool = False,
        timings: bool = False,
        image: Any = None,
        strength: float | None = None,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
    ) -> PipelineOutput:
        """Generate images; diffusers' argument names (fewstep.inputs checks them all first).

        `progress` shows a progress bar over the U-Net calls. `timings` records each stage's
        time in `timings_ms` (text_encoder; vae_encoder for img2img; sampler_step and
        unet_call per U-Net call; vae_decoder), waiting for the device after each; without it
        only `total` is recorded and a GPU backend is never waited on mid-call. A sampler may
        call the U-Net more than once a step (Heun: 2n − 1 calls for n steps);
        `settings["unet_calls"]` says how often.

        img2img (diffusers' img2img pipelines): `image` (fewstep.image_inputs: PIL images,
        arrays, image files) is encoded by the VAE encoder and noised to the first timestep
        that `strength` (default: diffusers', 0.8; SDXL 0.3) keeps; int(steps × strength) steps
        then run (LCM: all steps, over the lower part of its schedule). The size is the
        image's, rounded down to the model's size multiple, unless height and width are
        given. SDXL follows
        `StableDiffusionXLImg2ImgPipeline`: the size conditioning defaults to that size.

        SDXL (fewstep.prompt_sdxl, diffusers' StableDiffusionXLPipeline): `prompt_2` and
        `negative_prompt_2` go to the second text encoder (default: `prompt`,
        `negative_prompt`); the size conditioning `original_size`, `crops_coords_top_left`,
        `target_size` (default: (height, width), (0, 0), (height, width)) and its `negative_`
        counterparts for the unconditional half. Other models refuse these arguments.
        """
        info = self.info
        t_start = time.perf_counter()
        # 1. Check every argument before any graph runs.
        args = check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            seed=seed,
            generator=generator,
            latents=latents,
            eta=eta,
            guidance_rescale=guidance_rescale,
            output_type=output_type,
            scheduler=scheduler,
            info=info,
            samplers=SAMPLERS,
            limits=self.limits,
            image=image,
            strength=strength,
        )
        prompts, negatives = args.prompts, args.negative_prompts
        steps, guidance = args.num_inference_steps, args.guidance_scale
        height, width, num_images_per_prompt = args.height, args.width, args.num_images_per_prompt
        eta, guidance_rescale, seed = args.eta, args.guidance_rescale, args.seed
        sdxl_given = {
            "prompt_2": prompt_2,
            "negative_prompt_2": negative_prompt_2,
            "original_size": original_size,
            "crops_coords_top_left": crops_coords_top_left,
            "target_size": target_size,
            "negative_original_size": negative_original_size,
            "negative_crops_coords_top_left": negative_crops_coords_top_left,
            "negative_target_size": negative_target_size,
        }
        if self.sdxl is None:
            refuse_sdxl_arguments(info.family, sdxl_given)
            sdxl_args = None
        else:
            sdxl_args = self.sdxl.check(
                prompts,
                negatives,
                negative_prompt is not None,
                height,
                width,
                self.limits.max_prompt_chars,
                sdxl_given,
            )

        sampler_name = args.scheduler or info.scheduler_class
        # eta only means something to DDIM; diffusers ignores it elsewhere, and so do we.
        options = {"eta": eta} if sampler_name_for(sampler_name) == "ddim" else {}
        sampler = create_sampler(sampler_name, info.scheduler_config, **options)
        # Both raise ValueError when steps (and strength) ask for what the sampler can't do.
        if args.strength is not None:  # img2img: set exactly when an image is given
            self.check_image_encoder()
            sampler.set_img2img_timesteps(steps, args.strength)
        else:
            sampler.set_timesteps(steps)
        batch = args.batch
        latent_shape = (
            batch,
            info.latent_channels,
            height // info.vae_scale_factor,
            width // info.vae_scale_factor,
        )
        latents = args.latents
        use_embedded_guidance = info.guidance_embedding_dim is not None
        guided = (guidance if isinstance(guidance, tuple) else (guidance,))[0] > 1.0
        do_cfg = guided and not use_embedded_guidance
        if seed is None and args.generator is None:
            seed = secrets.randbits(63)
        draw = noise_drawer(args.generator if args.generator is not None else seed)
        ops = self.backend.array_ops

        # 2. Text conditioning: [uncond; cond] stacked into one batch of 2B when guiding.
        t0 = time.perf_counter()
        if self.sdxl is not None and sdxl_args is not None:  # + text_embeds, time_ids
            cond = self.sdxl.conditioning(
                self.backend,
                self.tokenizer,
                prompts,
                negatives,
                sdxl_args,
                do_cfg,
                num_images_per_prompt,
            )
        else:
            texts = negatives + prompts if do_cfg else prompts
            embeds = ops.repeat(self.encode_prompt(texts), num_images_per_prompt)
            cond = {"encoder_hidden_states": embeds}  # [(2)B, 77, C]
        if info.guidance_embedding_dim is not None:
            w = np.broadcast_to(np.subtract(guidance, 1.0), (batch,)).astype(np.float32)
            embedding = guidance_scale_embedding(w, info.guidance_embedding_dim)
            cond["timestep_cond"] = ops.asarray(embedding)  # [B, time_cond_proj_dim]
        # With `timings`, each stage waits for the device before the clock is read; without,
        # the host queues the next step while the device runs this one.
        sync = ops.synchronize if timings else _no_sync
        sync()
        stage_ms: dict[str, Any] = {
            "text_encoder": (time.perf_counter() - t0) * 1e3,
            "sampler_step": [],  # per U-Net call: scaling, U-Net call, guidance, update
            "unet_call": [],  # the backend's U-Net call alone
        }

        # 3. Initial latents on the backend: noise scaled to the sampler's starting level, or
        # (img2img) the image's latents noised to the first timestep that runs.
        t0 = time.perf_counter()
        if args.image is not None:
            per_image = isinstance(args.generator if args.generator is not None else seed, tuple)
            latents = ops.asarray(self.image_latents(args.image, sampler, draw, per_image))
            stage_ms["vae_encoder"] = (time.perf_counter() - t0) * 1e3
        else:
            if latents is None:
                latents = draw(latent_shape)
            scaled = latents * np.float32(sampler.init_noise_sigma)
            latents = ops.asarray(scaled.astype(np.float32))

        # Per-image guidance scales multiply row by row: [B, 1, 1, 1].
        cfg_scale: Any = guidance
        if isinstance(guidance, tuple):
            cfg_scale = ops.asarray(np.array(guidance, np.float32).reshape(-1, 1, 1, 1))

        # 4. Denoising loop.
        steps_iter = range(sampler.begin_index, len(sampler.timesteps))
        if progress:
            from tqdm.auto import tqdm

            steps_iter = tqdm(steps_iter, desc="sampling", unit="step", leave=False)
        for i in steps_iter:
            t0 = time.perf_counter()
            t = float(sampler.timesteps[i])
            model_in = ops.concat([latents, latents]) if do_cfg else latents
            model_in = sampler.scale_model_input(model_in, i)  # [(2)B, C, h, w]
            sync()
            t_unet = time.perf_counter()
            noise_pred = self.unet(model_in, t, cond)
            sync()
            stage_ms["unet_call"].append((time.perf_counter() - t_unet) * 1e3)
            if do_cfg:
                uncond, text = noise_pred[:batch], noise_pred[batch:]
                noise_pred = uncond + cfg_scale * (text - uncond)
                if guidance_rescale > 0:
                    noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale, ops)
            noise = None
            if sampler.needs_noise:
                noise = ops.asarray(draw(tuple(noise_pred.shape)))
            out = sampler.step(noise_pred, i, latents, noise=noise)
            latents = ops.float32(out.prev_sample)
            sync()
            stage_ms["sampler_step"].append((time.perf_counter() - t0) * 1e3)

        # 5. Decode. (LCM's last step returns its denoised estimate, which is what its
        # pipeline decodes.)
        t0 = time.perf_counter()
        images = self.decode(latents, as_uint8=args.output_type == "pil")
        stage_ms["vae_decoder"] = (time.perf_counter() - t0) * 1e3
        total_ms = (time.perf_counter() - t_start) * 1e3  # the images are on the host: synced
        timings_ms = {**stage_ms, "total": total_ms} if timings else {"total": total_ms}
        seed_out: int | list[int] | None  # the seeds used; None: the caller's generators
        if args.generator is not None:
            seed_out = None
        elif isinstance(seed, Sequence):
            seed_out = [int(s) for s in seed]
        else:
            seed_out = seed
        settings: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "num_inference_steps": steps,
            "guidance_scale": list(guidance) if isinstance(guidance, tuple) else guidance,
            "height": height,
            "width": width,
            "sampler": sampler.name,  # the `scheduler=` value that makes it again
            "unet_calls": len(sampler.timesteps) - sampler.begin_index,
            "seed": seed_out,
        }
        if args.image is not None:
            settings["strength"] = args.strength
        if sdxl_args is not None:
            settings.update(sdxl_args.settings())
        result = numpy_to_pil(images) if args.output_type == "pil" else images
        return PipelineOutput(result, seed_out, timings_ms, settings)
