"""Stage 1: train the AutoencoderKL of the default model on procedural scenes.

    python -m training.train_vae --run runs/vae [--stop-after-minutes M]

diffusers `AutoencoderKL` (3 blocks: x4 downsampling, 64x64 images -> 4x16x16 latents),
trained from scratch. Loss per batch (per-element means):

    MSE(x̂, x) + edge_weight * MSE(∇x̂, ∇x) + kl_weight * KL(q(z|x) || N(0, I))

with z sampled from the posterior. The optional edge term (finite differences along both
axes) weighs the pixels at edges again, the ones a soft reconstruction gets wrong (an
earlier, softer trial VAE rounded the squares' corners); it is off by default, since from
step 0 it slowed the first phase (MSE 0.43 vs 0.07 after 300 steps; README). Squared errors,
not L1: these images are two-valued per channel (palette colours are RGB-cube corners), and
with L1 (the median) the VAE sat at gray for the first few hundred steps (MSE ~1.0 after 250
steps). No perceptual or adversarial loss: LPIPS weights are not available here, and the
images are flat colours. Every `eval_every` steps: PSNR and the analyzer's full-scene
accuracy on `eval_scenes` (256) held-out scenes.

Output: `<run>/vae/` (a diffusers AutoencoderKL folder; `scaling_factor` = 1 / std of the
latent means of the held-out scenes, as SD's 0.18215 was measured), `recon.png` (held-out
scenes, reconstructions below), `<run>/training_state.json`. Written when the run stops,
finished or not; `training_state.json` says which.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import torch

from training import common, scenes
from training import config as configs

HELD_OUT_SEED_OFFSET = 1000  # held-out scenes: data_seed + this


def build_vae(cfg: configs.VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=scenes.IMAGE_SIZE,
        force_upcast=False,  # trained in bf16, runs in fp16 (checked by the quality report)
    )


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :, :, 1:] - x[:, :, :, :-1], x[:, :, 1:, :] - x[:, :, :-1, :]


def vae_loss(vae, x: torch.Tensor, noise: torch.Tensor, cfg: configs.VAEConfig):
    """x: [B, 3, 64, 64] in -1..1; noise: [B, C, 16, 16] standard normal."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * noise  # [B, C, 16, 16]
    recon = vae.decode(z).sample.float()  # [B, 3, 64, 64]
    mse = ((recon - x) ** 2).mean()
    (rx, ry), (gx, gy) = image_gradients(recon), image_gradients(x)
    edge = 0.5 * (((rx - gx) ** 2).mean() + ((ry - gy) ** 2).mean())
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).mean()
    loss = mse + cfg.edge_weight * edge + cfg.kl_weight * kl
    return loss, {"mse": mse.item(), "edge": edge.item(), "kl": kl.item()}


@torch.no_grad()
def evaluate(vae, cfg: configs.VAEConfig) -> dict[str, float]:
    """PSNR (0..1 scale, reconstructions from the posterior mean, rounded to uint8 like the
    pipeline's output) and the analyzer's accuracy on held-out scenes; latent statistics."""
    images, _, specs = common.scene_batch(0, cfg.eval_scenes, cfg.data_seed + HELD_OUT_SEED_OFFSET)
    recons, means = [], []
    for i in range(0, cfg.eval_scenes, 64):
        x = common.images_to_tensor(images[i : i + 64])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            mean = vae.encode(x).latent_dist.mean
            recons.append(common.tensor_to_images(vae.decode(mean).sample))
        means.append(mean.float())
    recon = np.concatenate(recons)
    latents = torch.cat(means)
    mse = ((recon.astype(np.float64) - images.astype(np.float64)) / 255.0) ** 2
    psnr = float(np.mean(10 * np.log10(1.0 / np.maximum(mse.mean(axis=(1, 2, 3)), 1e-10))))
    accuracy = scenes.attribute_accuracy(
        scenes.score(r, s) for r, s in zip(recon, specs, strict=True)
    )
    return {
        "psnr_db": psnr,
        "analyzer_correct": accuracy["correct"],
        "analyzer_shape": accuracy["shape"],
        "latent_mean": latents.mean().item(),
        "latent_std": latents.std().item(),
        "_recon": recon,
        "_images": images,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    args = parser.parse_args(argv)
    common.setup_torch(args.threads)
    cfg = configs.from_name("vae", args.preset)
    run = common.Run(args.run, "vae", cfg, inputs={})

    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    optimizer = torch.optim.AdamW(
        vae.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    start, compute_seconds = 0, 0.0
    state = run.load()
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, compute_seconds = state["step"], state["compute_seconds"]
    n_params = sum(p.numel() for p in vae.parameters())

    stop = common.StopFlag(args.stop_after_minutes, args.stop_at_step)
    progress = common.Progress(run, start, cfg.max_steps, cfg.batch_size, compute_seconds)
    common.log_environment(progress)
    progress.note(
        f"VAE {cfg.block_out_channels}: {n_params / 1e6:.3f} M parameters", params=n_params
    )
    save_clock = common.SaveClock(cfg.checkpoint_minutes)
    latent_hw = scenes.IMAGE_SIZE // 2 ** (len(cfg.block_out_channels) - 1)

    def checkpoint(step: int) -> None:
        run.save(
            {
                "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "compute_seconds": progress.compute_seconds,
            }
        )

    step = start
    vae.train()
    with stop:
        while step < cfg.max_steps and not stop(step):
            lr = common.lr_at(
                step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.final_lr_fraction
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, _, _ = common.scene_batch(step * cfg.batch_size, cfg.batch_size, cfg.data_seed)
            x = common.images_to_tensor(images)
            gen = common.step_generator(cfg.seed, step)
            noise = torch.randn(
                (cfg.batch_size, cfg.latent_channels, latent_hw, latent_hw), generator=gen
            )
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, parts = vae_loss(vae, x, noise, cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(step - 1, loss.item(), lr=lr, **parts)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                with progress.untimed():
                    vae.eval()
                    metrics = evaluate(vae, cfg)
                    vae.train()
                    shown = {k: round(v, 4) for k, v in metrics.items() if not k.startswith("_")}
                    progress.note(f"eval step {step}: {shown}", step=step, **shown)
            if save_clock.due():
                with progress.untimed():
                    checkpoint(step)

    progress.finish()
    checkpoint(step)
    vae.eval()
    metrics = evaluate(vae, cfg)
    scaling_factor = 1.0 / metrics["latent_std"]
    vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    out = pathlib.Path(args.run) / "vae"
    vae.save_pretrained(out, safe_serialization=True)
    shown = {k: round(v, 4) for k, v in metrics.items() if not k.startswith("_")}
    common.save_grid(
        list(metrics["_images"][:16]) + list(metrics["_recon"][:16]), 16, run.path / "recon.png"
    )
    run.write_state(
        step,
        cfg.max_steps,
        progress.compute_seconds,
        params=n_params,
        scaling_factor=round(scaling_factor, 5),
        **shown,
    )
    progress.note(
        f"stopped at step {step}/{cfg.max_steps}; wrote {out}: {shown}, "
        f"scaling_factor {scaling_factor:.5f}"
    )


if __name__ == "__main__":
    main()
