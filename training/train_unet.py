"""Stage 2: pretrain the CLIP text encoder, then train the text-conditioned U-Net (the teacher)
against it frozen.

    python -m training.train_unet --run runs/unet --vae runs/vae/vae [--stop-after-minutes M]

Latent diffusion (Rombach et al. 2022) in SD 1.x's setting, except for the schedule: SD's
scaled_linear betas (1000 steps, β 0.00085..0.012) rescaled to zero terminal SNR, with
v-prediction (`common.Schedule`; config `prediction_type`, `zero_terminal_snr`; the first
default model used epsilon on the plain schedule). Latents = scaling_factor * the VAE
posterior mean (the frozen VAE of stage 1; `num_scenes` scenes encoded once into
`<run>/latents.npy`, then cycled through in order), text conditioning through
cross-attention on every token state of a frozen CLIP text encoder (last_hidden_state, 77
tokens, padded with <|endoftext|>). The tokenizer is built in code: a CLIP BPE in which every
caption word of `training.scenes` is one token. 10% of captions are dropped to "" (what the
pipeline encodes as the negative prompt), so classifier-free guidance works.

Deviations from SD's recipe: no pretrained CLIP, but a text encoder pretrained here in a few
minutes to spell out every attribute a caption says (`training.pretrain_text`, which says why;
stored in `<run>/text_encoder.pt`); for speed on 2 CPU cores, Min-SNR-γ loss weighting (Hang
et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", γ = 5; for
v-prediction in the form that keeps the pure-noise step, `common.Schedule.loss_weight`), which
the paper measures to converge ~3x faster. The EMA of the U-Net's weights (0.999) ships.

Every `sample_every` steps the EMA model draws `sample_prompts` evaluation prompts (DDIM,
guidance 7.5, diffusers' DDIMScheduler) and the analyzer scores them: a progress signal, not
the quality report (training/evaluate.py).

Output: `<run>/model/`, a diffusers StableDiffusionPipeline folder (DDIMScheduler) holding the
EMA weights, and `<run>/training_state.json`; written whenever the run stops. The latent
cache stays in `<run>/` for the distillation.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

import numpy as np
import torch

from fewstep.export.testing import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH
from training import common, pretrain_text, scenes
from training import config as configs

SAMPLE_GUIDANCE = 7.5


def build_text_encoder(cfg: configs.UNetConfig, vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=cfg.text_hidden_size,
        hidden_act="quick_gelu",  # OpenAI CLIP's, as SD 1.x
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    return CLIPTextModel(text_config)


def build_unet(cfg: configs.UNetConfig, latent_size: int, time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    levels = cfg.cross_attention_levels
    if len(levels) != len(cfg.block_out_channels):
        raise ValueError(
            "cross_attention_levels must have one entry per block "
            f"({len(cfg.block_out_channels)}), got {len(levels)}"
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def pretrained_text_encoder(
    run_dir: pathlib.Path, text_encoder, tokenize, vocab: dict[str, int], cfg: configs.UNetConfig
) -> dict:
    """Pretrain `text_encoder` in place (training.pretrain_text), or load what an earlier
    start of this run pretrained (`<run>/text_encoder.pt`); returns its record (seconds,
    held-out accuracy)."""
    path = run_dir / "text_encoder.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        text_encoder.load_state_dict(saved["state"])
        return saved["record"]
    start = time.perf_counter()
    accuracy = pretrain_text.pretrain(
        text_encoder,
        tokenize,
        vocab[EOS_TOKEN],
        steps=cfg.text_pretrain_steps,
        batch_size=cfg.text_pretrain_batch,
        learning_rate=cfg.text_pretrain_lr,
        seed=cfg.seed,
        data_seed=cfg.data_seed,
        dropout=cfg.caption_dropout,
    )
    record = {"seconds": time.perf_counter() - start, "accuracy": accuracy}
    tmp = path.with_suffix(".tmp")
    torch.save({"state": text_encoder.state_dict(), "record": record}, tmp)
    tmp.rename(path)
    return record


def save_text_encoder(text_encoder, folder: pathlib.Path) -> None:
    """Save in the Hub SD layout (`text_model.` prefix), as fewstep.export.testing does:
    transformers 4 and 5 and diffusers load it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = text_encoder.config
    config.architectures = ["CLIPTextModel"]
    config.dtype = "float32"
    config.save_pretrained(folder)
    state = {}
    for key, value in text_encoder.state_dict().items():
        key = key.removeprefix("text_model.")
        if key != "embeddings.position_ids":
            state["text_model." + key] = value.detach().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_model_index(folder: pathlib.Path, pipeline_class: str, scheduler_class: str) -> None:
    import diffusers

    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_scheduler(folder: pathlib.Path, kind: str, schedule: common.Schedule) -> str:
    config = schedule.scheduler_config(kind)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config["_class_name"]


@torch.no_grad()
def sample_ddim(
    unet,
    text_encoder,
    vae,
    ids: torch.Tensor,
    uncond_ids: torch.Tensor,
    schedule: common.Schedule,
    steps: int,
    guidance: float,
    seed: int,
) -> np.ndarray:
    """diffusers' DDIMScheduler loop with CFG (a progress check): uint8 images [B, 64, 64, 3]."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(schedule.scheduler_config("ddim"))
    scheduler.set_timesteps(steps)
    cond = text_encoder(ids).last_hidden_state
    uncond = text_encoder(uncond_ids.expand_as(ids)).last_hidden_state
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((ids.shape[0], 4, size, size), generator=gen)
    for t in scheduler.timesteps:
        out = unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).sample
        out_u, out_c = out.chunk(2)
        latents = scheduler.step(out_u + guidance * (out_c - out_u), t, latents).prev_sample
    return common.tensor_to_images(vae.decode(latents / vae.config.scaling_factor).sample)


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    parser.add_argument("--vae", required=True, help="the VAE folder of stage 1 (<run>/vae)")
    parser.add_argument(
        "--allow-incomplete", action="store_true", help="accept an unfinished VAE run (smoke runs)"
    )
    args = parser.parse_args(argv)
    common.setup_torch(args.threads)
    cfg = configs.from_name("unet", args.preset)
    vae_dir = pathlib.Path(args.vae).resolve()
    common.require_complete(vae_dir, "VAE", args.allow_incomplete)
    run = common.Run(args.run, "unet", cfg, inputs={"vae": str(vae_dir)})
    out = run.path / "model"

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    latent_size = scenes.IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    tokenizer_dir = run.path / "tokenizer"
    vocab = common.write_tokenizer(tokenizer_dir)
    tokenize = common.CaptionTokenizer(tokenizer_dir)
    cache = common.LatentCache(run.path, vae_dir, cfg.data_seed, cfg.num_scenes)
    cache.build(vae)

    torch.manual_seed(cfg.seed)
    text_encoder = build_text_encoder(cfg, vocab)
    unet = build_unet(cfg, latent_size)
    text_record = pretrained_text_encoder(run.path, text_encoder, tokenize, vocab, cfg)
    text_encoder.eval().requires_grad_(False)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ema_unet = common.EMA(unet)
    start, compute_seconds = 0, 0.0
    state = run.load()
    if state is not None:
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        ema_unet.load_state_dict(state["ema_unet"])
        start, compute_seconds = state["step"], state["compute_seconds"]
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())

    schedule = common.Schedule(cfg.prediction_type, cfg.zero_terminal_snr)
    alphas = schedule.alphas_cumprod()  # [1000]
    loss_weight = schedule.loss_weight(cfg.min_snr_gamma)
    uncond_ids = tokenize([""])
    eval_prompts = [p for p in scenes.evaluation_prompts() if p.kind == "single"][
        : cfg.sample_prompts // 2
    ]
    eval_prompts += [p for p in scenes.evaluation_prompts() if p.kind == "two"][
        : cfg.sample_prompts // 2
    ]

    stop = common.StopFlag(args.stop_after_minutes, args.stop_at_step)
    progress = common.Progress(run, start, cfg.max_steps, cfg.batch_size, compute_seconds)
    common.log_environment(progress)
    progress.note(
        f"U-Net {cfg.block_out_channels}: {n_unet / 1e6:.3f} M parameters; "
        f"text encoder {n_text / 1e6:.3f} M, pretrained in {text_record['seconds']:.0f} s, "
        f"held-out captions read back fully right: {text_record['accuracy']['all']:.4f}",
        unet_params=n_unet,
        text_params=n_text,
        text_pretraining=text_record,
    )
    save_clock = common.SaveClock(cfg.checkpoint_minutes)

    def checkpoint(step: int) -> None:
        run.save(
            {
                "unet": unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "step": step,
                "compute_seconds": progress.compute_seconds,
            }
        )

    def ema_unet_copy():
        unet_copy = build_unet(cfg, latent_size).eval()
        unet_copy.load_state_dict(unet.state_dict())
        ema_unet.copy_to(unet_copy)
        return unet_copy

    def sample_check(step: int) -> dict[str, float]:
        ids = tokenize([p.prompt for p in eval_prompts])
        images = sample_ddim(
            ema_unet_copy(),
            text_encoder,
            vae,
            ids,
            uncond_ids,
            schedule,
            cfg.sample_steps,
            SAMPLE_GUIDANCE,
            seed=0,
        )
        results = [scenes.score(im, p.target) for im, p in zip(images, eval_prompts, strict=True)]
        half = cfg.sample_prompts // 2
        common.save_grid(list(images), half, run.path / "samples.png")
        return {
            "single_correct": scenes.attribute_accuracy(results[:half])["correct"],
            "two_correct": scenes.attribute_accuracy(results[half:])["correct"],
            **{f"attr_{k}": v for k, v in scenes.attribute_accuracy(results).items()},
        }

    step = start
    unet.train()
    with stop:
        while step < cfg.max_steps and not stop(step):
            lr = common.lr_at(
                step,
                cfg.learning_rate,
                cfg.warmup_steps,
                cfg.max_steps,
                cfg.final_lr_fraction,
                cfg.lr_restarts,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            latents, captions = cache.batch(step, cfg.batch_size)  # [B, 4, 16, 16]
            gen = common.step_generator(cfg.seed, step)
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            ids = tokenize(captions)  # [B, 77]
            t = torch.randint(0, common.NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            with torch.no_grad():
                context = text_encoder(ids).last_hidden_state  # [B, 77, C]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                output = unet(noisy, t, context).sample  # [B, 4, 16, 16]
            target = schedule.target(latents, noise, a)
            per_sample = ((output.float() - target) ** 2).mean(dim=(1, 2, 3))
            loss = (loss_weight[t] * per_sample).mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = common.ema_decay_at(step, cfg.ema_decay)
            ema_unet.update(unet, decay)
            step += 1
            progress.update(
                step - 1,
                loss.item(),
                lr=lr,
                grad_norm=grad_norm.item(),
                mse=per_sample.mean().item(),
            )
            if step % cfg.sample_every == 0:
                with progress.untimed():
                    metrics = sample_check(step)
                    progress.note(
                        f"samples step {step}: "
                        + json.dumps({k: round(v, 3) for k, v in metrics.items()}),
                        step=step,
                        **metrics,
                    )
            if save_clock.due():
                with progress.untimed():
                    checkpoint(step)

    progress.finish()
    checkpoint(step)
    metrics = sample_check(step)
    tmp = run.path / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ema_unet_copy().save_pretrained(tmp / "unet", safe_serialization=True)
    save_text_encoder(text_encoder, tmp / "text_encoder")
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    shutil.copytree(vae_dir, tmp / "vae")
    scheduler_class = write_scheduler(tmp / "scheduler", "ddim", schedule)
    write_model_index(tmp, "StableDiffusionPipeline", scheduler_class)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    run.write_state(
        step,
        cfg.max_steps,
        progress.compute_seconds + cache.build_seconds + text_record["seconds"],
        latent_cache_seconds=round(cache.build_seconds, 1),
        text_pretrain_seconds=round(text_record["seconds"], 1),
        text_pretrain_accuracy=text_record["accuracy"],
        unet_params=n_unet,
        text_params=n_text,
        **{k: round(v, 4) for k, v in metrics.items()},
    )
    progress.note(
        f"stopped at step {step}/{cfg.max_steps}; wrote {out}; samples: "
        + json.dumps({k: round(v, 3) for k, v in metrics.items()})
    )


if __name__ == "__main__":
    main()
