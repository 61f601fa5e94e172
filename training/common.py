"""Shared pieces of the training scripts: torch set-up, scene batches, the caption tokenizer,
SD's noise schedule, EMA, the learning-rate schedule, resumable run folders, progress lines.

Determinism: batch `step` holds scenes `step * B ... step * B + B - 1` of the stage's data
seed (`training.scenes.scene_at`), and every random draw of a step (noise, timesteps, caption
dropout, guidance scales) comes from a torch.Generator seeded with (seed, step). So a run
stopped at any checkpoint and resumed does the same steps as one that never stopped, and
nothing but the weights, optimizer and EMA needs saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from fewstep.export.testing import write_clip_tokenizer
from training import scenes

TORCH_THREADS = 2
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # SD's scaled_linear schedule
CHECKPOINT_NAME = "checkpoint.pt"
STATE_NAME = "training_state.json"


def setup_torch(threads: int = TORCH_THREADS) -> None:
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        # Settable only before the first parallel work of the process (tests call main twice).
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of one step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def scene_batch(start: int, count: int, seed: int) -> tuple[np.ndarray, list[str], list[Any]]:
    """Scenes start..start+count-1 of `seed`: uint8 [count, 64, 64, 3], captions, specs."""
    specs = [scenes.scene_at(start + i, seed) for i in range(count)]
    images = np.stack([scenes.render_scene(s) for s in specs])
    return images, [scenes.caption(s) for s in specs], specs


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in -1..1."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in -1..1 -> uint8 [B, H, W, 3] (rounded like fewstep.pipeline)."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return (x * 255).round().astype(np.uint8)


def write_tokenizer(folder: pathlib.Path) -> dict[str, int]:
    """An SD1-style CLIP tokenizer (vocab.json + merges.txt, pad = <|endoftext|>) in which every
    caption word is one token; returns the vocabulary."""
    return write_clip_tokenizer(folder, words=scenes.CAPTION_WORDS)


class CaptionTokenizer:
    """Captions -> int64 ids [B, 77] with fewstep's runtime tokenizer (what generation uses),
    cached per caption (the grammar has a few thousand)."""

    def __init__(self, folder: pathlib.Path):
        from fewstep.tokenizer import CLIPTokenizer

        self._tok = CLIPTokenizer.from_folder(folder)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: Iterable[str]) -> torch.Tensor:
        rows = []
        for text in captions:
            if text not in self._cache:
                self._cache[text] = self._tok([text])[0]
            rows.append(self._cache[text])
        return torch.from_numpy(np.stack(rows))


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, 64, 64] in -1..1 -> scaled latents [B, 4, 16, 16] (posterior mean)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean = vae.encode(x).latent_dist.mean
    return mean.float() * vae.config.scaling_factor


class LatentCache:
    """Scaled VAE latents of scenes 0..count-1 of `seed`, fp16, in `<folder>/latents.npy`.

    The U-Net and the distillation see each scene several times; encoding it once instead of
    at every visit saves the VAE encoder's share of a step (~20%, README). Built in chunks,
    each recorded in `latents.json`, so an interrupted build resumes; the record also holds
    the VAE's sha256, and a cache of another VAE, seed or count is rebuilt.
    """

    CHUNK = 512

    def __init__(self, folder: pathlib.Path, vae_dir: pathlib.Path, seed: int, count: int):
        self.path = folder / "latents.npy"
        self.record_path = folder / "latents.json"
        self.seed, self.count = seed, count
        self.key = {
            "vae_sha256": file_sha256(vae_dir / "diffusion_pytorch_model.safetensors"),
            "seed": seed,
            "count": count,
        }
        self.latents: torch.Tensor | None = None
        self.build_seconds = 0.0  # compute spent encoding, over all (resumed) builds

    def _done(self) -> int:
        if not (self.record_path.exists() and self.path.exists()):
            return -1
        record = json.loads(self.record_path.read_text())
        if {k: record.get(k) for k in self.key} != self.key:
            return -1
        self.build_seconds = record.get("seconds", 0.0)
        return record["done"]

    def build(self, vae, note: Any = print) -> None:
        done = self._done()
        side = scenes.IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (self.count, vae.config.latent_channels, side, side)  # [N, 4, 16, 16]
        if done < 0:
            self.build_seconds = 0.0
            array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16, shape=shape)
            done = 0
        else:
            array = np.lib.format.open_memmap(self.path, mode="r+")
        if done < self.count:
            note(f"encoding scenes {done}..{self.count - 1} of seed {self.seed} into {self.path}")
        start_time = chunk_time = time.perf_counter()
        for start in range(done, self.count, self.CHUNK):
            n = min(self.CHUNK, self.count - start)
            images, _, _ = scene_batch(start, n, self.seed)
            for i in range(0, n, 128):
                x = images_to_tensor(images[i : i + 128])
                array[start + i : start + i + len(x)] = encode_latents(vae, x).numpy()
            array.flush()
            now = time.perf_counter()
            self.build_seconds += now - chunk_time
            chunk_time = now
            record = {**self.key, "done": start + n, "seconds": round(self.build_seconds, 1)}
            self.record_path.write_text(json.dumps(record) + "\n")
            if (start // self.CHUNK) % 20 == 19 or start + n == self.count:
                rate = (start + n - done) / (time.perf_counter() - start_time)
                note(f"  {start + n}/{self.count} scenes encoded ({rate:.0f}/s)")
        del array
        self.latents = torch.from_numpy(np.load(self.path).astype(np.float32))

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """Batch `step`: scenes (step * B + i) mod count; latents [B, 4, h, w], captions."""
        assert self.latents is not None, "build() first"
        indices = [(step * batch_size + i) % self.count for i in range(batch_size)]
        captions = [scenes.caption(scenes.scene_at(i, self.seed)) for i in indices]
        return self.latents[indices], captions


# ---------------------------------------------------------------------------------------------
# Diffusion
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The noise schedule and parameterization a model is trained with.

    `epsilon` + SD's scaled_linear schedule leaves √ᾱ_T = 0.068 of the clean latent at the last
    step, which the first default model learned to read its background from (README).
    `zero_terminal_snr` rescales the betas so that ᾱ_T = 0 (Lin et al. 2023, Algorithm 1), which
    needs v-prediction and trailing timesteps at inference (their §3.2, §3.3).
    """

    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type='v_prediction'")

    @classmethod
    def of_model(cls, folder: pathlib.Path) -> Schedule:
        """The schedule of a model folder written by these scripts (its scheduler config)."""
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return cls(config["prediction_type"], bool(config.get("rescale_betas_zero_snr", False)))

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t, t = 0..999, float32: fewstep's samplers' values, which equal diffusers'."""
        from fewstep.samplers.base import SchedulerConfig
        from fewstep.samplers.base import alphas_cumprod as sampler_alphas

        config = SchedulerConfig.from_dict(self.scheduler_config("ddim"))
        return torch.from_numpy(sampler_alphas(config)).float()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor):
        """What the U-Net learns to output for x_t = √ᾱ·latents + √(1−ᾱ)·noise."""
        if self.prediction_type == "epsilon":
            return noise
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents  # v (Salimans & Ho 2022)

    def split(self, output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor):
        """(x̂0, ε̂) from the U-Net output at x_t."""
        if self.prediction_type == "epsilon":
            return (x - (1 - alpha).sqrt() * output) / alpha.sqrt(), output
        return (
            alpha.sqrt() * x - (1 - alpha).sqrt() * output,
            (1 - alpha).sqrt() * x + alpha.sqrt() * output,
        )

    def loss_weight(self, min_snr_gamma: float | None) -> torch.Tensor:
        """Per-timestep weight of the output MSE [1000]: Min-SNR-γ (Hang et al. 2023).

        epsilon: min(SNR, γ)/SNR, the paper's. v: min(SNR + 1, γ + 1)/(SNR + 1), i.e. weight 1
        up to SNR γ and the paper's decay above it. (The paper's v form, min(SNR, γ)/(SNR + 1),
        gives the pure-noise step weight 0, and that step is where zero terminal SNR matters.)
        """
        alphas = self.alphas_cumprod().double()
        snr = alphas / (1 - alphas)
        if min_snr_gamma is None:
            return torch.ones_like(snr).float()
        if self.prediction_type == "epsilon":
            return (torch.clamp(snr, max=min_snr_gamma) / snr).float()
        return (torch.clamp(snr + 1, max=min_snr_gamma + 1) / (snr + 1)).float()

    def scheduler_config(self, kind: str) -> dict[str, Any]:
        """The scheduler_config.json of the teacher ("ddim", SD-style) or the student ("lcm",
        the LCM Dreamshaper v7 layout)."""
        base = {
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "beta_start": BETA_START,
            "beta_end": BETA_END,
            "beta_schedule": "scaled_linear",
            "prediction_type": self.prediction_type,
            "clip_sample": False,
            "rescale_betas_zero_snr": self.zero_terminal_snr,
            # trailing spacing starts at t = 999, the only step with no signal left
            "timestep_spacing": "trailing" if self.zero_terminal_snr else "leading",
        }
        if kind == "ddim":
            return {
                "_class_name": "DDIMScheduler",
                **base,
                "set_alpha_to_one": self.zero_terminal_snr,
                "steps_offset": 0 if self.zero_terminal_snr else 1,
            }
        if kind == "lcm":
            return {
                "_class_name": "LCMScheduler",
                **base,
                "original_inference_steps": 50,
                "set_alpha_to_one": True,
                "steps_offset": 0,
                "timestep_scaling": 10.0,
            }
        raise ValueError(f"kind must be 'ddim' or 'lcm', got {kind!r}")


class EMA:
    """Exponential moving average of a module's parameters (fp32 shadow copies)."""

    def __init__(self, module: torch.nn.Module):
        self.shadow = {k: v.detach().clone().float() for k, v in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float) -> None:
        for name, param in module.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            param.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the module's parameters")
        self.shadow = {k: v.clone() for k, v in state.items()}


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up (the average forgets the random init quickly)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def lr_at(
    step: int,
    peak: float,
    warmup: int,
    total: int,
    final_fraction: float,
    restarts: tuple[tuple[int, float], ...] = (),
) -> float:
    """Linear warm-up to `peak`, then cosine decay to `final_fraction * peak` at `total`.

    `restarts` ((step, peak fraction), ...) end the cosine early and start it again (SGDR,
    Loshchilov & Hutter 2017): from each restart step the rate falls from `fraction * peak`
    to the same final rate at the next restart or at `total`. Steps before the first restart
    follow the schedule of a run that ends there, so a finished run can be continued exactly.
    """
    starts = [s for s, _ in restarts]
    if starts != sorted(starts) or any(not warmup < s < total for s in starts):
        raise ValueError(f"restart steps must increase within ({warmup}, {total}): {starts}")
    if step < warmup:
        return peak * (step + 1) / warmup
    begin, end, top = warmup, total, 1.0
    for start, fraction in restarts:
        if step < start:
            end = start
            break
        begin, top = start, fraction
    progress = min(1.0, (step - begin) / max(1, end - begin))
    wave = 1 + math.cos(math.pi * progress)
    return peak * (final_fraction + (top - final_fraction) * 0.5 * wave)


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


def config_dict(config: Any) -> dict[str, Any]:
    """The config as stored in config.json (tuples become lists, at any depth)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


class Run:
    """A run folder: config.json (fixed at the first start), checkpoint.pt (atomic), log.jsonl,
    training_state.json (step, compute seconds, whether the run is complete)."""

    def __init__(self, path: str | os.PathLike, stage: str, config: Any, inputs: dict[str, str]):
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        wanted = {"stage": stage, "config": config_dict(config), "inputs": inputs}
        config_path = self.path / "config.json"
        if config_path.exists():
            stored = json.loads(config_path.read_text())
            if stored != wanted:
                diff = sorted(
                    k
                    for k in set(stored.get("config", {})) | set(wanted["config"])
                    if stored.get("config", {}).get(k) != wanted["config"].get(k)
                )
                raise ValueError(
                    f"run folder {self.path} was started with another config or inputs "
                    f"(config fields differing: {diff}; stored inputs {stored.get('inputs')}, "
                    f"given {inputs}); use a new folder"
                )
        else:
            config_path.write_text(json.dumps(wanted, indent=2) + "\n")

    def load(self) -> dict[str, Any] | None:
        path = self.path / CHECKPOINT_NAME
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path / (CHECKPOINT_NAME + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path / CHECKPOINT_NAME)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_state(self, step: int, max_steps: int, compute_seconds: float, **extra: Any) -> None:
        state = {
            "step": step,
            "max_steps": max_steps,
            "complete": step >= max_steps,
            "compute_seconds": round(compute_seconds, 1),
            **extra,
        }
        (self.path / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")


def require_complete(folder: pathlib.Path, what: str, allow_incomplete: bool) -> None:
    """Refuse to build on an unfinished upstream stage unless asked to (smoke runs)."""
    state_path = folder.parent / STATE_NAME
    if not state_path.exists():
        raise FileNotFoundError(f"{what}: {state_path} not found; is {folder} a training output?")
    state = json.loads(state_path.read_text())
    if not state["complete"] and not allow_incomplete:
        raise ValueError(
            f"{what} at {folder} stopped at step {state['step']} of {state['max_steps']}; "
            "finish it, or pass --allow-incomplete (smoke runs)"
        )


class StopFlag:
    """When a loop should save a checkpoint and stop early: SIGINT/SIGTERM, a wall-clock limit
    or a step. A context manager: the signal handlers it installs are removed on exit."""

    def __init__(self, stop_after_minutes: float | None = None, stop_at_step: int | None = None):
        self.deadline = (
            None if stop_after_minutes is None else time.time() + 60 * stop_after_minutes
        )
        self.stop_at_step = stop_at_step
        self.signalled = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def __call__(self, step: int) -> bool:
        return (
            self.signalled
            or (self.deadline is not None and time.time() >= self.deadline)
            or (self.stop_at_step is not None and step >= self.stop_at_step)
        )


class Progress:
    """One line per `every` steps: step, loss (mean since the last line), images/s, s/step,
    elapsed compute and ETA."""

    def __init__(
        self,
        run: Run,
        start_step: int,
        max_steps: int,
        batch: int,
        compute_seconds: float,
        every: int = 10,
    ):
        self.run, self.max_steps, self.batch, self.every = run, max_steps, batch, every
        self.compute_seconds = compute_seconds
        self._t = time.perf_counter()
        self._cpu = time.process_time()
        self._losses: list[float] = []
        self._steps = 0
        print(
            f"start at step {start_step}/{max_steps} (compute so far {_hms(compute_seconds)})",
            flush=True,
        )

    def update(self, step: int, loss: float, **extra: float) -> None:
        self._losses.append(loss)
        self._steps += 1
        if (step + 1) % self.every and step + 1 != self.max_steps:
            return
        now, cpu = time.perf_counter(), time.process_time()
        wall = now - self._t
        self.compute_seconds += wall
        s_per_step = wall / self._steps
        record = {
            "step": step + 1,
            "loss": float(np.mean(self._losses)),
            "images_per_s": round(self.batch / s_per_step, 2),
            "s_per_step": round(s_per_step, 3),
            "cpu_s_per_step": round((cpu - self._cpu) / self._steps, 3),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "compute_s": round(self.compute_seconds, 1),
            **{k: round(float(v), 5) for k, v in extra.items()},
        }
        self.run.log(record)
        eta = s_per_step * (self.max_steps - step - 1)
        extras = "  ".join(f"{k} {v:.4g}" for k, v in extra.items())
        print(
            f"step {step + 1}/{self.max_steps}  loss {record['loss']:.5f}  {extras}  "
            f"{record['images_per_s']:.1f} img/s  {s_per_step:.3f} s/step  "
            f"(cpu {record['cpu_s_per_step']:.3f}, load {record['load_avg_1m']})  "
            f"elapsed {_hms(self.compute_seconds)}  ETA {_hms(eta)}",
            flush=True,
        )
        self._t, self._cpu, self._losses, self._steps = now, cpu, [], 0

    def finish(self) -> None:
        """Count the steps since the last line (the run stopped between two lines)."""
        if self._steps:
            self.compute_seconds += time.perf_counter() - self._t
            self._t, self._cpu, self._losses, self._steps = (
                time.perf_counter(),
                time.process_time(),
                [],
                0,
            )

    def note(self, text: str, **values: Any) -> None:
        self.run.log({"note": text, **values})
        print(text, flush=True)

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Exclude the time of something that is not training (evaluation, saving)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._t += time.perf_counter() - start


class SaveClock:
    """Says when a periodic checkpoint is due (every `minutes` of wall time)."""

    def __init__(self, minutes: float):
        self.interval, self.last = 60.0 * minutes, time.time()

    def due(self) -> bool:
        if time.time() - self.last <= self.interval:
            return False
        self.last = time.time()
        return True


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def save_grid(images: list[np.ndarray], columns: int, path: pathlib.Path, scale: int = 2) -> None:
    """uint8 images [H, W, 3] -> one PNG, row-major, 2 px gaps."""
    from PIL import Image

    h, w, _ = images[0].shape
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = image
    Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    ).save(path)


def common_arguments(parser: Any) -> None:
    parser.add_argument("--run", required=True, help="run folder (created, or resumed)")
    parser.add_argument("--preset", default="default", help="config preset (training/config.py)")
    parser.add_argument(
        "--stop-after-minutes",
        type=float,
        default=None,
        help="save a checkpoint and stop after this many minutes (resume later)",
    )
    parser.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="save a checkpoint and stop at this step (resume later)",
    )
    parser.add_argument("--threads", type=int, default=TORCH_THREADS)


def log_environment(progress: Progress) -> None:
    progress.note(
        "environment",
        python=sys.version.split()[0],
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
    )
