"""training/: each stage runs end to end on a toy config (preset "tiny", seconds), a run
stopped at a checkpoint and resumed ends with the same weights as one that never stopped, and
the outputs are diffusers folders that diffusers, fewstep's exporter and the runtime load."""

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

# training/ is a folder of the checkout, not installed: conftest imports it by path.
from training import common, distill_lcm, scenes, ship, train_unet, train_vae  # noqa: E402
from training import config as configs  # noqa: E402


def _stage_args(stage, run, upstream):
    args = ["--run", str(run), "--preset", "tiny", "--threads", "1"]
    if stage is train_unet:
        args += ["--vae", str(upstream)]
    elif stage is distill_lcm:
        args += ["--teacher", str(upstream)]
    return args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train_vae.main(_stage_args(train_vae, root / "vae", None))
    train_unet.main(_stage_args(train_unet, root / "unet", root / "vae" / "vae"))
    distill_lcm.main(_stage_args(distill_lcm, root / "lcm", root / "unet" / "model"))
    return root


def _weights(folder):
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(path).items():
            out[f"{path.relative_to(folder)}:{key}"] = value
    return out


@pytest.mark.parametrize(
    "stage, output, upstream",
    [
        (train_vae, "vae", None),
        (train_unet, "model", "vae/vae"),
        (distill_lcm, "model", "unet/model"),
    ],
    ids=["vae", "unet", "lcm"],
)
def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, runs, stage, output, upstream):
    run = tmp_path / "run"
    args = _stage_args(stage, run, runs / upstream if upstream else None)
    stage.main(args + ["--stop-at-step", "2"])
    state = json.loads((run / "training_state.json").read_text())
    assert (state["step"], state["complete"]) == (2, False)
    stage.main(args)  # resumes from checkpoint.pt at step 2
    assert json.loads((run / "training_state.json").read_text())["complete"]
    name = {train_vae: "vae", train_unet: "unet", distill_lcm: "lcm"}[stage]
    resumed, straight = _weights(run / output), _weights(runs / name / output)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_resume_refuses_another_config(tmp_path, runs):
    run = tmp_path / "run"
    train_vae.main(_stage_args(train_vae, run, None) + ["--stop-at-step", "1"])
    with pytest.raises(ValueError, match="was started with another config"):
        train_vae.main(["--run", str(run), "--preset", "default", "--stop-at-step", "1"])


def test_lr_restart_continues_the_schedule_of_the_run_that_ended_there():
    """A run with a restart at step 6000 follows, before it, exactly the schedule of a run of
    6000 steps (so it can continue that run's checkpoint), then decays again from half the
    peak to the same final rate."""
    peak, warmup, final = 5e-4, 200, 0.1
    restarted = [common.lr_at(s, peak, warmup, 11000, final, ((6000, 0.5),)) for s in range(11000)]
    ended = [common.lr_at(s, peak, warmup, 6000, final) for s in range(6000)]
    assert restarted[:6000] == ended
    assert restarted[6000] == pytest.approx(0.5 * peak) and ended[-1] == pytest.approx(final * peak)
    assert restarted[-1] == pytest.approx(final * peak, rel=1e-6)
    assert all(a >= b for a, b in zip(restarted[6000:], restarted[6001:], strict=False))
    for bad in (((100, 0.5),), ((11000, 0.5),), ((8000, 0.5), (7000, 0.5))):
        with pytest.raises(ValueError, match="restart steps"):
            common.lr_at(0, peak, warmup, 11000, final, bad)


def test_a_config_with_nested_tuples_resumes_in_its_run_folder(tmp_path):
    cfg = configs.from_name("unet", "default")
    common.Run(tmp_path, "unet", cfg, inputs={})
    common.Run(tmp_path, "unet", cfg, inputs={})  # the stored config.json reads back equal
    with pytest.raises(ValueError, match=r"\['lr_restarts', 'max_steps'\]"):
        common.Run(tmp_path, "unet", configs.from_name("unet", "fifth"), inputs={})


@pytest.mark.parametrize("preset", sorted(configs.PRESETS))
def test_every_preset_has_a_valid_learning_rate_schedule(preset):
    cfg = configs.from_name("unet", preset)
    args = (cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.final_lr_fraction)
    assert common.lr_at(cfg.max_steps - 1, *args, cfg.lr_restarts) > 0


def test_unfinished_upstream_is_refused(tmp_path, runs):
    train_vae.main(_stage_args(train_vae, tmp_path / "vae", None) + ["--stop-at-step", "1"])
    with pytest.raises(ValueError, match="stopped at step 1 of 4"):
        train_unet.main(_stage_args(train_unet, tmp_path / "unet", tmp_path / "vae" / "vae"))


def test_runtime_and_transformers_tokenize_captions_alike(runs):
    from fewstep.tokenizer import CLIPTokenizer as RuntimeTokenizer

    folder = runs / "unet" / "model" / "tokenizer"
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = RuntimeTokenizer.from_folder(folder)
    captions = [scenes.caption(scenes.scene_at(i)) for i in range(50)] + [""]
    expected = reference(captions, padding="max_length", max_length=77, return_tensors="np")
    np.testing.assert_array_equal(ours(captions), expected["input_ids"])
    # Every caption word is one token.
    vocab = json.loads((folder / "vocab.json").read_text())
    words = ["<|startoftext|>", "a</w>", "small</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert ours(["a small red circle"])[0, :6].tolist() == [vocab[w] for w in words]


def test_outputs_load_in_diffusers(runs):
    teacher = diffusers.StableDiffusionPipeline.from_pretrained(
        runs / "unet" / "model", local_files_only=True
    )
    student = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        runs / "lcm" / "model", local_files_only=True
    )
    assert isinstance(teacher.scheduler, diffusers.DDIMScheduler)
    assert isinstance(student.scheduler, diffusers.LCMScheduler)
    assert student.unet.config.time_cond_proj_dim == 8
    for pipe, steps in ((teacher, 2), (student, 2)):
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a red circle", num_inference_steps=steps, output_type="np").images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_student_exports_and_runs_in_fewstep(runs, tmp_path):
    from fewstep.export import export_package
    from fewstep.pipeline import Pipeline

    package = export_package(runs / "lcm" / "model", tmp_path / "pkg", progress=False)
    pipe = Pipeline.from_pretrained(package)
    assert pipe.info.guidance_embedding_dim == 8
    assert (pipe.info.default_height, pipe.info.default_num_inference_steps) == (64, 4)
    image = pipe("a red circle on a blue background", seed=0, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    scenes.score(image, "a red circle on a blue background")  # the analyzer takes its output


def test_ship_writes_one_fp16_folder_that_is_both_diffusers_and_package(runs, tmp_path):
    import onnx

    from fewstep.export import export_package
    from fewstep.package import PackageError, verify_package
    from fewstep.pipeline import Pipeline

    out = tmp_path / "models" / "scenes"
    sizes = ship.ship(runs / "lcm" / "model", out)
    assert not (out / "vae_encoder").exists()
    manifest = verify_package(out)  # hashes rewritten after dropping the encoder
    assert manifest is not None and "vae_encoder" not in manifest["graphs"]
    assert set(manifest["shared_weights"]) == {"unet", "text_encoder"}
    stored = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    # the U-Net and text encoder weights are stored once: in their graphs, only small folded
    # constants are left
    for graph in ("unet", "text_encoder"):
        model = onnx.load(str(out / graph / "model.onnx"), load_external_data=False)
        kept = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert all(int(np.prod(t.dims)) <= 16 for t in kept), [(t.name, t.dims) for t in kept]
        assert manifest["shared_weights"][graph]["shared"] > 0
    saved = sum(r["bytes_before"] - r["bytes_after"] for r in manifest["shared_weights"].values())
    assert sizes["model"] == sizes["diffusers"] + sizes["package"] - saved
    # the same images as the fp16 package apart, and diffusers loads the folder as a pipeline
    apart = export_package(runs / "lcm" / "model", tmp_path / "apart", dtype="fp16", progress=False)
    images = [
        Pipeline.from_pretrained(p)("a red circle", seed=0, output_type="np").images[0]
        for p in (out, apart)
    ]
    assert images[0].shape == (64, 64, 3) and np.isfinite(images[0]).all()
    np.testing.assert_array_equal(images[0], images[1])
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    torch_image = Pipeline.from_pretrained(out, backend="torch")("a red circle", seed=0).images[0]
    assert torch_image.size == (64, 64)
    # a failing ship leaves the shipped model as it was and no temporary folder behind
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(PackageError, match="not found"):
        ship.ship(runs / "lcm" / "missing", out)
    broken = tmp_path / "broken"
    shutil.copytree(runs / "lcm" / "model", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="safetensors|header|deserializ"):  # noqa: B017
        ship.ship(broken, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in out.parent.iterdir()] == ["scenes"]


def test_latent_cache_lines_up_with_its_scenes(runs):
    from diffusers import AutoencoderKL

    from training import common

    vae_dir = runs / "vae" / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    cache = common.LatentCache(runs / "unet", vae_dir, seed=2, count=24)  # the tiny U-Net's
    cache.build(vae)
    latents, captions = cache.batch(step=5, batch_size=4)  # scenes 20..23 of seed 2
    images, expected_captions, _ = common.scene_batch(20, 4, seed=2)
    assert captions == expected_captions
    expected = common.encode_latents(vae, common.images_to_tensor(images))
    torch.testing.assert_close(latents, expected.half().float(), rtol=0, atol=0)
    wrapped, _ = cache.batch(step=6, batch_size=4)  # 24 wraps to scene 0
    torch.testing.assert_close(wrapped[0], cache.batch(step=0, batch_size=4)[0][0])


@pytest.mark.parametrize(
    "schedule",
    [common.Schedule(), common.Schedule("v_prediction", zero_terminal_snr=True)],
    ids=["epsilon", "v-zero_snr"],
)
def test_schedule_matches_the_diffusers_scheduler_it_writes(schedule):
    alphas = schedule.alphas_cumprod()
    for kind, cls in (("ddim", diffusers.DDIMScheduler), ("lcm", diffusers.LCMScheduler)):
        scheduler = cls.from_config(schedule.scheduler_config(kind))
        assert scheduler.config.prediction_type == schedule.prediction_type
        torch.testing.assert_close(alphas, scheduler.alphas_cumprod, rtol=0, atol=1e-6)
    if schedule.zero_terminal_snr:
        assert alphas[-1] == 0  # no signal left at the last step
        ddim = diffusers.DDIMScheduler.from_config(schedule.scheduler_config("ddim"))
        ddim.set_timesteps(4)
        assert ddim.timesteps[0] == 999  # sampling starts from the pure-noise step
    else:
        assert 0.06 < alphas[-1].sqrt() < 0.07  # SD's leak


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_schedule_target_and_split_agree_with_diffusers(prediction_type):
    """The training target is what diffusers' DDPMScheduler.get_velocity / the noise gives,
    and split() recovers the clean latent and the noise from it, as the samplers do."""
    schedule = common.Schedule(prediction_type, zero_terminal_snr=prediction_type != "epsilon")
    alphas = schedule.alphas_cumprod()
    t = torch.tensor([0, 250, 500, 998, 999])
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn((2, 5, 4, 3, 3), generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    x = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = schedule.target(latents, noise, a)
    ddpm = diffusers.DDPMScheduler.from_config(schedule.scheduler_config("ddim"))
    expected = noise if prediction_type == "epsilon" else ddpm.get_velocity(latents, noise, t)
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-5)
    x0, eps = schedule.split(target, x, a)
    torch.testing.assert_close(x0, latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-4)


# -- LCM distillation against diffusers' consistency_distillation example --------------------
#
# The reference below is the Latent Consistency Distillation step of diffusers'
# examples/consistency_distillation/train_lcm_distill_sd_wds.py, its formulas written out:
# α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t); x̂_0 and ε̂ from the output as `get_predicted_original_sample`
# and `get_predicted_noise`; c_skip, c_out as `scalings_for_boundary_conditions` (σ_data 0.5,
# timestep scaling 10); the teacher's conditional and unconditional calls made separately and
# combined as pred = cond + w · (cond − uncond); `DDIMSolver.ddim_step` with its table of ᾱ_prev
# ([ᾱ_0, ᾱ at each earlier solver timestep]); the target network at t_n = t_{n+k} − k (≥ 0);
# the pseudo-Huber loss. Formulas in fp64 on the fp32 U-Net outputs.

LCD_SOLVER_STEPS = 50


def _reference_x0_and_eps(prediction_type, output, x, alpha, sigma):
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    return alpha * x - sigma * output, alpha * output + sigma * x  # v-prediction


def _reference_boundary_scalings(t):
    scaled = 10.0 * t.double()
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def _reference_guidance_embedding(w, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1)))
    args = (w.double() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _reference_lcd(nets, prediction_type, batch, huber_c):
    """(loss, student's model_pred, target) as diffusers' example computes them."""
    student, teacher, target = nets
    scheduler = diffusers.DDPMScheduler.from_config(
        common.Schedule(prediction_type).scheduler_config("ddim")
    )
    alphas_cumprod = scheduler.alphas_cumprod.double()
    alpha_schedule, sigma_schedule = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    topk = scheduler.config.num_train_timesteps // LCD_SOLVER_STEPS
    solver_timesteps = torch.arange(1, LCD_SOLVER_STEPS + 1) * topk - 1
    solver_alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[solver_timesteps[:-1]]])

    def per_sample(table, t):
        return table[t].view(-1, 1, 1, 1)

    def x0_eps(net, x, t, context, **kwargs):
        output = net(x.float(), t, context, **kwargs).sample.double()
        alpha, sigma = per_sample(alpha_schedule, t), per_sample(sigma_schedule, t)
        return _reference_x0_and_eps(prediction_type, output, x.double(), alpha, sigma)

    index, w, context = batch["index"], batch["w"].double(), batch["context"]
    start = solver_timesteps[index]
    end = torch.clamp(start - topk, min=0)
    latents, noise = batch["latents"].double(), batch["noise"].double()
    noisy = per_sample(alpha_schedule, start) * latents + per_sample(sigma_schedule, start) * noise
    w_embedding = _reference_guidance_embedding(w, student.config.time_cond_proj_dim).float()

    with torch.no_grad():
        pred_x0, _ = x0_eps(student, noisy, start, context, timestep_cond=w_embedding)
        c_skip_start, c_out_start = _reference_boundary_scalings(start)
        model_pred = c_skip_start * noisy + c_out_start * pred_x0

        uncond_context = batch["uncond_context"].expand_as(context)
        cond_x0, cond_eps = x0_eps(teacher, noisy, start, context)
        uncond_x0, uncond_eps = x0_eps(teacher, noisy, start, uncond_context)
        w4 = w.view(-1, 1, 1, 1)
        guided_x0 = cond_x0 + w4 * (cond_x0 - uncond_x0)
        guided_eps = cond_eps + w4 * (cond_eps - uncond_eps)
        alpha_prev = per_sample(solver_alphas_prev, index)
        x_prev = alpha_prev.sqrt() * guided_x0 + (1 - alpha_prev).sqrt() * guided_eps

        target_x0, _ = x0_eps(target, x_prev, end, context, timestep_cond=w_embedding)
        c_skip, c_out = _reference_boundary_scalings(end)
        target_value = c_skip * x_prev + c_out * target_x0
    loss = torch.mean(torch.sqrt((model_pred - target_value) ** 2 + huber_c**2) - huber_c)
    return loss, model_pred, target_value


@pytest.fixture(scope="module")
def lcd_nets(tiny_model):
    """(student, teacher, target): the tiny sd1 U-Net as teacher; a student with a random
    guidance projection; a target network a little away from the student."""
    teacher = diffusers.UNet2DConditionModel.from_pretrained(tiny_model("sd1") / "unet")
    teacher = teacher.eval().requires_grad_(False)
    torch.manual_seed(0)
    student = distill_lcm.make_student(teacher, 16)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.5)
    target = distill_lcm.make_student(teacher, 16).requires_grad_(False)
    with torch.no_grad():
        for p_target, p_student in zip(target.parameters(), student.parameters(), strict=True):
            p_target.copy_(p_student + 0.01 * torch.randn_like(p_student))
    return student, teacher, target


def _lcd_batch(w):
    gen = torch.Generator().manual_seed(3)
    return {
        "latents": torch.randn(4, 4, 8, 8, generator=gen),
        "noise": torch.randn(4, 4, 8, 8, generator=gen),
        "index": torch.tensor([0, 1, 23, LCD_SOLVER_STEPS - 1]),  # t_n clamped at 0, then not
        "w": torch.tensor(w, dtype=torch.float64),
        "context": torch.randn(4, 77, 32, generator=gen),
        "uncond_context": torch.randn(1, 77, 32, generator=gen),
    }


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_distillation_loss_and_target_match_diffusers_example(lcd_nets, prediction_type):
    student, teacher, target = lcd_nets
    batch = _lcd_batch([2.0, 9.5, 0.5, 14.0])
    huber_c = 0.001
    loss, prediction, target_value = distill_lcm.distillation_loss(
        student,
        teacher,
        target,
        common.Schedule(prediction_type),
        **batch,
        num_ddim_timesteps=LCD_SOLVER_STEPS,
        huber_c=huber_c,
    )
    want_loss, want_prediction, want_target = _reference_lcd(
        lcd_nets, prediction_type, batch, huber_c
    )
    # The guidance moves the target far more than the tolerance: CFG mistakes cannot hide.
    _, _, unguided = _reference_lcd(lcd_nets, prediction_type, _lcd_batch([0.0] * 4), huber_c)
    scale = float(want_target.abs().max())
    assert float((want_target - unguided).abs().max()) > 1e-2 * scale
    for got, want in ((prediction, want_prediction), (target_value, want_target)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
    assert prediction.requires_grad and not target_value.requires_grad  # only the student learns


def test_min_snr_weight_keeps_the_pure_noise_step_for_v_prediction():
    weight = common.Schedule("v_prediction", zero_terminal_snr=True).loss_weight(5.0)
    snr = 1 / (1 / common.Schedule("v_prediction", True).alphas_cumprod().double() - 1)
    assert weight[-1] == 1.0 and torch.all(weight[snr <= 5] == 1.0)
    assert torch.all(weight[snr > 5] < 1.0) and torch.all(torch.diff(weight) >= 0)
    with pytest.raises(ValueError, match="v_prediction"):
        common.Schedule("epsilon", zero_terminal_snr=True)


def test_text_pretraining_labels_say_what_the_caption_says():
    from training import pretrain_text

    for index in range(200):
        scene = scenes.scene_at(index, seed=5)
        labels = pretrain_text.caption_labels(scenes.scene_target(scene))
        decoded = {
            name: values[label] if label < len(values) else None
            for (name, values), label in zip(pretrain_text.GROUPS, labels, strict=True)
        }
        said = scenes.parse_caption(scenes.caption(scene))
        assert decoded["background"] == said.background
        for slot in (0, 1):
            obj = said.objects[slot] if slot < len(said.objects) else None
            for attr in ("color", "shape", "size", "position"):
                assert decoded[f"object{slot}.{attr}"] == (getattr(obj, attr) if obj else None)
    empty = pretrain_text.caption_labels(None)
    assert empty == [len(values) for _, values in pretrain_text.GROUPS]


def test_text_pretraining_reads_the_states_from_the_first_end_token_on(tmp_path):
    from fewstep.export.testing import EOS_TOKEN
    from training import config, pretrain_text

    vocab = common.write_tokenizer(tmp_path)
    tokenize = common.CaptionTokenizer(tmp_path)
    encoder = train_unet.build_text_encoder(config.from_name("unet", "tiny"), vocab).eval()
    captions = ["a red circle", "", "a small blue square at the top left on a red background"]
    ids = tokenize(captions)  # [3, 77]: <|startoftext|> words <|endoftext|> padding
    with torch.no_grad():
        states, rows = pretrain_text.summary_states(encoder, ids, vocab[EOS_TOKEN])
        full = encoder(ids).last_hidden_state
    first_eos = [1 + len(c.split()) for c in captions]
    assert rows.tolist() == [r for r, e in enumerate(first_eos) for _ in range(77 - e)]
    expected = torch.cat([full[r, e:] for r, e in enumerate(first_eos)])
    torch.testing.assert_close(states, expected, rtol=0, atol=0)


def test_quality_report_splits_shape_accuracy_by_the_shape_asked_for():
    from training import evaluate

    def drawn(shape, color, position):
        obj = scenes.SceneObject(shape, color, "large", position)
        return scenes.render_scene(scenes.Scene("blue", (obj,)))

    square = scenes.parse_caption("a red square on a blue background")
    pair = scenes.parse_caption("a red circle and a green triangle on a blue background")
    two = scenes.render_scene(
        scenes.Scene(
            "blue",
            (
                scenes.SceneObject("circle", "red", "large", "top left"),
                scenes.SceneObject("square", "green", "large", "bottom right"),
            ),
        )
    )
    results = [
        scenes.score(drawn("square", "red", "center"), square),
        scenes.score(drawn("circle", "red", "center"), square),  # a square drawn as a circle
        scenes.score(two, pair),  # the triangle drawn as a square
    ]
    summary = evaluate.summarize(results, [square, square, pair])
    assert summary["n"] == 3 and summary["shape"] == 0.5
    assert summary["shape_by_name"] == {"circle": 1.0, "square": 0.5, "triangle": 0.0}


def test_int8_gates_count_points_below_the_fp32_row():
    from training import evaluate

    names = [c.name for c in evaluate.int8_configurations()]
    assert names == [
        "student-lcm4-g8.5-openvino-fp32",
        "student-lcm4-g8.5-openvino-bf16",
        "student-lcm4-g8.5-openvino-int8",
        "student-lcm4-g8.5-openvino-int8-bf16",
    ]

    def row(single, two):
        return {"single": {"correct": single}, "two": {"correct": two}}

    # 1 prompt of 60 fewer (1.67 points) passes a 2-point gate; 2 of 40 (5 points) does not
    by_name = {names[0]: row(0.9, 0.6), names[2]: row(0.9 - 1 / 60, 0.65)}
    by_name[names[3]] = row(0.9, 0.55)
    gates = evaluate.int8_gates(by_name)
    assert gates["student_lcm4_int8_single_points_below_fp32"]["value"] == 1.67
    assert gates["student_lcm4_int8_single_points_below_fp32"]["pass"]
    assert gates["student_lcm4_int8_two_points_below_fp32"]["value"] == -5.0
    assert not gates["student_lcm4_int8_bf16_two_points_below_fp32"]["pass"]
    assert evaluate.int8_gates({names[2]: row(1, 1)}) == {}  # no fp32 row: no gate
