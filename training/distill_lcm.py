"""Stage 3: distill the teacher into a few-step Latent Consistency Model with guidance embedding.

    python -m training.distill_lcm --run runs/lcm --teacher runs/unet/model [--stop-after-minutes M]

Latent Consistency Distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1)
as diffusers' `examples/consistency_distillation/train_lcm_distill_sd_wds.py` does it:

1. x_{t_{n+k}} = q(x | x_0) at a timestep of the DDIM skip schedule (k = 1000 / 50 = 20,
   timesteps 19, 39, ..., 999); w ~ U[w_min, w_max] per sample.
2. Student: f_θ(x_{t_{n+k}}, w, c) = c_skip · x + c_out · x̂_0, with x̂_0 from the U-Net's
   output in the teacher's parameterization (ε or v; `common.Schedule`), the guidance scale
   embedded (w·1000, sinusoidal, `time_cond_proj_dim` wide: the U-Net's `timestep_cond`).
3. Teacher, one DDIM step with CFG (LCM eq. 9): x̂_0 and ε̂ = cond + w · (cond − uncond), then
   x_{t_n} = √ᾱ_{t_n} x̂_0 + √(1 − ᾱ_{t_n}) ε̂.
4. Target: the EMA ("target") network at (x_{t_n}, t_n, w); loss = pseudo-Huber(student −
   target), c = 0.001; EMA decay 0.95.

The boundary-condition scalings (σ_data = 0.5, timestep scaling 10) and the guidance
embedding are the ones `LCMScheduler` and fewstep's LCM sampler apply at inference, so
`w = guidance_scale − 1` there. The student starts as a copy of the teacher with the new
`time_embedding.cond_proj` zero-initialised (so it starts as the teacher) and keeps the
teacher's schedule and prediction type. The text encoder, tokenizer and VAE are the teacher's,
frozen; the data are the teacher's training scenes (its run's latent cache).

Output: `<run>/model/`, a diffusers LatentConsistencyModelPipeline folder (LCMScheduler, the
LCM Dreamshaper v7 layout) holding the student, and `<run>/training_state.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch

from fewstep.samplers.lcm import SIGMA_DATA, guidance_scale_embedding
from training import common, scenes, train_unet
from training import config as configs

TIMESTEP_SCALING = 10.0
SAMPLE_GUIDANCE = 8.5  # fewstep's default for LCM packages


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of the consistency function (diffusers' discrete form)."""
    scaled = TIMESTEP_SCALING * t.double()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


def w_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.from_numpy(guidance_scale_embedding(w.double().numpy(), dim))


def skipping_step(
    index: torch.Tensor, num_ddim_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n) of DDIM skip-schedule indices: t_{n+k} = (index + 1)·k − 1 and
    t_n = t_{n+k} − k, clamped at 0 (k = 1000 / num_ddim_timesteps)."""
    k = common.NUM_TRAIN_TIMESTEPS // num_ddim_timesteps
    t_start = (index + 1) * k - 1
    return t_start, torch.clamp(t_start - k, min=0)


def consistency_output(unet, x, t, alpha, w_emb, context, schedule: common.Schedule, bf16: bool):
    """f(x, t, w, c) = c_skip(t)·x + c_out(t)·x̂_0, x̂_0 from the U-Net's output at x_t."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = unet(x, t, context, timestep_cond=w_emb).sample.float()
    x0, _ = schedule.split(out, x, alpha)
    c_skip, c_out = boundary_scalings(t)
    return c_skip * x + c_out * x0


@torch.no_grad()
def teacher_ddim_step(
    teacher, x, t, alpha, alpha_prev, w, context, uncond_context, schedule, bf16: bool
):
    """x_{t_n}: one DDIM step of the teacher from x_{t_{n+k}} with the LCM paper's CFG (eq. 9),
    cond + w·(cond − uncond) on both x̂_0 and ε̂, the conditional half first in the batch."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = teacher(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([context, uncond_context.expand_as(context)]),
        ).sample.float()
    x0_both, eps_both = schedule.split(out, torch.cat([x, x]), torch.cat([alpha, alpha]))
    x0_cond, x0_uncond = x0_both.chunk(2)
    eps_cond, eps_uncond = eps_both.chunk(2)
    w4 = w.float().view(-1, 1, 1, 1)
    x0_guided = x0_cond + w4 * (x0_cond - x0_uncond)
    eps_guided = eps_cond + w4 * (eps_cond - eps_uncond)
    return alpha_prev.sqrt() * x0_guided + (1 - alpha_prev).sqrt() * eps_guided


def distillation_loss(
    student,
    teacher,
    target,
    schedule: common.Schedule,
    *,
    latents: torch.Tensor,
    noise: torch.Tensor,
    index: torch.Tensor,
    w: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    num_ddim_timesteps: int,
    huber_c: float,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, the student's f at x_{t_{n+k}}, the target network's f at the teacher's
    x_{t_n}) of one batch (steps 1-4 of the module docstring); `index` picks each sample's
    DDIM timestep, `w` its guidance scale. Gradients flow into the student only."""
    alphas = schedule.alphas_cumprod()
    t_start, t_prev = skipping_step(index, num_ddim_timesteps)
    a_start, a_prev = alphas[t_start].view(-1, 1, 1, 1), alphas[t_prev].view(-1, 1, 1, 1)
    x_start = a_start.sqrt() * latents + (1 - a_start).sqrt() * noise
    w_emb = w_embedding(w, student.config.time_cond_proj_dim)  # [B, D]
    prediction = consistency_output(
        student, x_start, t_start, a_start, w_emb, context, schedule, bf16
    )
    x_prev = teacher_ddim_step(
        teacher, x_start, t_start, a_start, a_prev, w, context, uncond_context, schedule, bf16
    )
    with torch.no_grad():
        target_value = consistency_output(
            target, x_prev, t_prev, a_prev, w_emb, context, schedule, bf16
        )
    loss = (torch.sqrt((prediction - target_value) ** 2 + huber_c**2) - huber_c).mean()
    return loss, prediction, target_value


def load_teacher(folder: pathlib.Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    text_encoder = (
        CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
    )
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False)
    return unet, text_encoder, vae


def make_student(teacher, time_cond_proj_dim: int):
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(
        {**teacher.config, "time_cond_proj_dim": time_cond_proj_dim}
    )
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


@torch.no_grad()
def sample_lcm(
    unet,
    context: torch.Tensor,
    vae,
    schedule: common.Schedule,
    steps: int,
    guidance: float,
    seed: int,
) -> np.ndarray:
    """diffusers' LCMScheduler loop (a progress check): uint8 images [B, 64, 64, 3]."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(schedule.scheduler_config("lcm"))
    scheduler.set_timesteps(steps)
    batch = context.shape[0]
    w_emb = w_embedding(torch.full((batch,), guidance - 1.0), unet.config.time_cond_proj_dim)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, 4, size, size), generator=gen)
    for t in scheduler.timesteps:
        out = unet(latents, t, context, timestep_cond=w_emb).sample
        latents, denoised = scheduler.step(out, t, latents, generator=gen, return_dict=False)
    return common.tensor_to_images(vae.decode(denoised / vae.config.scaling_factor).sample)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    parser.add_argument(
        "--teacher", required=True, help="the teacher folder of stage 2 (<run>/model)"
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="accept an unfinished teacher run (smoke runs)",
    )
    args = parser.parse_args(argv)
    common.setup_torch(args.threads)
    cfg = configs.from_name("lcm", args.preset)
    teacher_dir = pathlib.Path(args.teacher).resolve()
    common.require_complete(teacher_dir, "teacher", args.allow_incomplete)
    run = common.Run(args.run, "lcm", cfg, inputs={"teacher": str(teacher_dir)})
    out = run.path / "model"

    teacher, text_encoder, vae = load_teacher(teacher_dir)
    tokenize = common.CaptionTokenizer(teacher_dir / "tokenizer")
    # The teacher's training scenes, from its run's latent cache (rebuilt if it is gone).
    teacher_run = json.loads((teacher_dir.parent / "config.json").read_text())["config"]
    cache = common.LatentCache(
        teacher_dir.parent, teacher_dir / "vae", teacher_run["data_seed"], teacher_run["num_scenes"]
    )
    cache.build(vae)
    torch.manual_seed(cfg.seed)
    student = make_student(teacher, cfg.time_cond_proj_dim).train()
    target = make_student(teacher, cfg.time_cond_proj_dim).eval().requires_grad_(False)
    target.load_state_dict(student.state_dict())
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    start, compute_seconds = 0, 0.0
    state = run.load()
    if state is not None:
        student.load_state_dict(state["student"])
        target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        start, compute_seconds = state["step"], state["compute_seconds"]

    schedule = common.Schedule.of_model(teacher_dir)  # the student keeps the teacher's
    with torch.no_grad():
        uncond_context = text_encoder(tokenize([""])).last_hidden_state  # [1, 77, C]
    eval_prompts = [p for p in scenes.evaluation_prompts() if p.kind == "single"][
        : cfg.sample_prompts // 2
    ]
    eval_prompts += [p for p in scenes.evaluation_prompts() if p.kind == "two"][
        : cfg.sample_prompts // 2
    ]
    with torch.no_grad():
        eval_context = text_encoder(tokenize([p.prompt for p in eval_prompts])).last_hidden_state

    stop = common.StopFlag(args.stop_after_minutes, args.stop_at_step)
    progress = common.Progress(run, start, cfg.max_steps, cfg.batch_size, compute_seconds)
    common.log_environment(progress)
    save_clock = common.SaveClock(cfg.checkpoint_minutes)

    def checkpoint(step: int) -> None:
        run.save(
            {
                "student": student.state_dict(),
                "target": target.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "compute_seconds": progress.compute_seconds,
            }
        )

    def sample_check() -> dict[str, float]:
        student.eval()
        images = sample_lcm(
            student, eval_context, vae, schedule, cfg.sample_steps, SAMPLE_GUIDANCE, seed=0
        )
        student.train()
        results = [scenes.score(im, p.target) for im, p in zip(images, eval_prompts, strict=True)]
        half = cfg.sample_prompts // 2
        common.save_grid(list(images), half, run.path / "samples.png")
        return {
            "single_correct": scenes.attribute_accuracy(results[:half])["correct"],
            "two_correct": scenes.attribute_accuracy(results[half:])["correct"],
        }

    step = start
    with stop:
        while step < cfg.max_steps and not stop(step):
            lr = common.lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            latents, captions = cache.batch(step, cfg.batch_size)  # [B, 4, 16, 16]
            gen = common.step_generator(cfg.seed, step)
            batch = cfg.batch_size
            with torch.no_grad():
                context = text_encoder(tokenize(captions)).last_hidden_state  # [B, 77, C]
            index = torch.randint(0, cfg.num_ddim_timesteps, (batch,), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(
                batch, generator=gen, dtype=torch.float64
            )
            loss, _, _ = distillation_loss(
                student,
                teacher,
                target,
                schedule,
                latents=latents,
                noise=noise,
                index=index,
                w=w,
                context=context,
                uncond_context=uncond_context,
                num_ddim_timesteps=cfg.num_ddim_timesteps,
                huber_c=cfg.huber_c,
                bf16=cfg.bf16,
            )
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p_target, p_student in zip(
                    target.parameters(), student.parameters(), strict=True
                ):
                    p_target.lerp_(p_student, 1.0 - cfg.target_ema_decay)
            step += 1
            progress.update(step - 1, loss.item(), lr=lr, grad_norm=grad_norm.item())
            if step % cfg.sample_every == 0:
                with progress.untimed():
                    metrics = sample_check()
                    progress.note(
                        f"samples step {step} (LCM {cfg.sample_steps} steps, guidance "
                        f"{SAMPLE_GUIDANCE}): {json.dumps(metrics)}",
                        step=step,
                        **metrics,
                    )
            if save_clock.due():
                with progress.untimed():
                    checkpoint(step)

    progress.finish()
    checkpoint(step)
    metrics = sample_check()
    tmp = run.path / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.eval().save_pretrained(tmp / "unet", safe_serialization=True)
    for name in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(teacher_dir / name, tmp / name)
    scheduler_class = train_unet.write_scheduler(tmp / "scheduler", "lcm", schedule)
    train_unet.write_model_index(tmp, "LatentConsistencyModelPipeline", scheduler_class)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    run.write_state(step, cfg.max_steps, progress.compute_seconds, **metrics)
    progress.note(
        f"stopped at step {step}/{cfg.max_steps}; wrote {out}; samples: {json.dumps(metrics)}"
    )


if __name__ == "__main__":
    main()
