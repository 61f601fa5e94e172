"""The img2img parity helpers shared by the img2img test modules (SD 1.x/2.x, LCM and
SD-Turbo in test_img2img.py, SDXL in test_img2img_sdxl.py): diffusers' schedulers under
fewstep's sampler names, the test picture, and `Img2ImgParity`, which runs one `Case` through
a fewstep pipeline and diffusers' img2img pipeline of the same tiny model.

Same noise on both sides: diffusers' img2img draws, from its generator and in this order, the
VAE encoder's latent sample (`latent_dist.sample(generator)`), the noise `add_noise` adds at
the first kept timestep, and then each step's noise (ancestral and SDE samplers). fewstep draws
the same three from its noise source in the same order, so a torch.Generator behind conftest's
`TorchNoise` feeds both the same numbers: one generator for the call, or one per image (a list
of generators in diffusers, a list of TorchNoise in fewstep).

PNDM and PLMS: diffusers' PNDMScheduler has no begin index, and the tail of its call list
that diffusers' img2img pipelines feed it is misread by its call counter. fewstep runs the
method afresh from the first kept timestep instead (fewstep.samplers.pndm), and the reference
is diffusers' own PNDM doing exactly that (`PNDMFromKept`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from fewstep.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import TorchNoise  # noqa: E402


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB image [H, W, 3]: gradients plus noise, so the encoder sees structure."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return (base + rng.integers(0, 56, (height, width, 3))).astype(np.uint8)


# --- diffusers' schedulers for fewstep's names -------------------------------------------


class PNDMFromKept(diffusers.PNDMScheduler):
    """diffusers' PNDM run afresh over the steps an img2img run keeps (fewstep's PNDM and
    PLMS img2img): the call list of a run over the lowest n − `skip` timesteps, δ = T // n,
    after `skip` placeholders that the img2img pipeline's get_timesteps slices off."""

    skip = 0

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device=device)
        kept = self._timesteps[: num_inference_steps - self.skip]
        half = self.config.num_train_timesteps // num_inference_steps // 2
        if self.config.skip_prk_steps:
            self.prk_timesteps = np.array([])
            plms = np.concatenate([kept[:-1], kept[-2:-1], kept[-1:]])[::-1]
        else:
            prk = np.array(kept[-self.pndm_order :]).repeat(2) + np.tile([0, half], self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = kept[:-3][::-1]
        self.plms_timesteps = plms.copy()
        calls = np.concatenate([np.zeros(self.skip), self.prk_timesteps, plms]).astype(np.int64)
        self.timesteps = torch.from_numpy(calls).to(device)


KARRAS_OFF = {"use_karras_sigmas": False}
DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# fewstep's name → (diffusers scheduler class, the config values the name fixes)
SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, KARRAS_OFF),
    "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "euler_karras": (diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "heun": (diffusers.HeunDiscreteScheduler, KARRAS_OFF),
    "heun_karras": (diffusers.HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {**DPM, **KARRAS_OFF}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {**DPM, "use_karras_sigmas": True}),
    "dpmpp_2m_sde": (
        diffusers.DPMSolverMultistepScheduler,
        {**DPM, "algorithm_type": "sde-dpmsolver++", **KARRAS_OFF},
    ),
    "unipc": (diffusers.UniPCMultistepScheduler, {"solver_order": 2, **KARRAS_OFF}),
    "unipc_karras": (
        diffusers.UniPCMultistepScheduler,
        {"solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (diffusers.LCMScheduler, {}),
    "plms": (PNDMFromKept, {"skip_prk_steps": True}),
    "pndm": (PNDMFromKept, {}),
}


def kept_steps(steps: int, strength: float) -> tuple[int, int]:
    """(t_start, steps that run) as diffusers' get_timesteps computes them."""
    init = min(int(steps * strength), steps)
    t_start = max(steps - init, 0)
    return t_start, steps - t_start


# --- one case through both pipelines -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    family: str
    sampler: str | None  # None: the package's own scheduler
    steps: int
    strength: float
    guidance: float
    prompts: tuple[str, ...] = ("a red cat",)
    per_prompt: int = 1
    images: str = "pil"  # "pil": one PIL image; "pils": one per prompt; "float": float array
    size: tuple[int, int] = (64, 64)  # the input image's (height, width)
    generators: str = "one"  # "one" for the call, "each": one per generated image


class Img2ImgParity:
    """diffusers' img2img pipelines of the tiny models (one per family, schedulers swapped
    per case) and the inputs one case gives both sides."""

    def __init__(self, tiny_model):
        self._tiny_model = tiny_model
        self._pipes: dict[str, object] = {}

    def reference(self, family: str, sampler: str | None, skip: int):
        if family not in self._pipes:
            folder = self._tiny_model(family)
            if family == "lcm":
                pipe = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(
                    folder, safety_checker=None
                )
            else:  # SD-Turbo's documented img2img entry point gives StableDiffusionImg2Img
                pipe = diffusers.AutoPipelineForImage2Image.from_pretrained(
                    folder, safety_checker=None
                )
                assert isinstance(pipe, diffusers.StableDiffusionImg2ImgPipeline)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[family] = pipe
        pipe = self._pipes[family]
        folder = self._tiny_model(family)
        if sampler is None:  # the folder's own scheduler, as it ships
            config = diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler")
            cls, fixed = getattr(diffusers, config["_class_name"]), {}
            if cls is diffusers.PNDMScheduler:
                cls = PNDMFromKept
        else:
            cls, fixed = SCHEDULERS[sampler]
            config = cls.load_config(folder, subfolder="scheduler")
        pipe.scheduler = cls.from_config(config, **fixed)
        if isinstance(pipe.scheduler, PNDMFromKept):
            pipe.scheduler.skip = skip
        return pipe

    @staticmethod
    def images(case: Case):
        height, width = case.size
        count = len(case.prompts) if case.images == "pils" else 1
        arrays = [picture(height, width, seed=i) for i in range(count)]
        if case.images == "float":
            return arrays[0].astype(np.float32) / 255.0
        pils = [Image.fromarray(a) for a in arrays]
        return pils if case.images == "pils" else pils[0]

    def run(self, ours: Pipeline, case: Case) -> tuple[np.ndarray, np.ndarray]:
        batch = len(case.prompts) * case.per_prompt
        image = self.images(case)
        common = dict(
            image=image,
            strength=case.strength,
            num_inference_steps=case.steps,
            guidance_scale=case.guidance,
            num_images_per_prompt=case.per_prompt,
            output_type="np",
        )
        if case.family != "lcm":  # diffusers' LCM pipeline takes no negative prompt
            common["negative_prompt"] = ["ugly"] * len(case.prompts)
        if case.generators == "each":
            theirs = [torch.Generator().manual_seed(11 + i) for i in range(batch)]
            mine: object = [TorchNoise(11 + i) for i in range(batch)]
        else:
            theirs, mine = torch.Generator().manual_seed(11), TorchNoise(11)
        t_start, _ = kept_steps(case.steps, case.strength)
        reference = self.reference(case.family, case.sampler, t_start)
        expected = reference(list(case.prompts), generator=theirs, **common).images
        got = ours(list(case.prompts), generator=mine, scheduler=case.sampler, **common)
        assert got.settings["strength"] == case.strength
        return got.images, expected
