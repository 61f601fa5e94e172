"""The GPU suite's report: the log's table, the performance targets, and the verdict.

`format_table(results)`: the results JSON as the text table the log ends with (checks, kernels,
U-Net steps, end to end runs, quality, tuned ops' choices, errors, the `targets` summary and
the `all checks ok` line). `target_summary(results)`: each of `TARGETS` against a GPU run's
measurements (device time in CUDA graphs), and the SDXL U-Net step beside them, reported
with no target (none is set for it); nothing for a CPU run. `all_checks_ok(results)`: every
check passed (both U-Net steps' included) and no section failed (the suite's exit status).
"""

from __future__ import annotations

from typing import Any

UNET_SECTIONS = {"unet": "U-Net ", "sdxl_unet": "SDXL U-Net "}  # section: its title
E2E_SECTIONS = ("turbo", "sdxl_turbo")


def format_table(results: dict[str, Any]) -> str:
    """The results as the log's closing table, section by section, then the verdict."""
    lines = [f"fewstep GPU suite — {results['env']['card'].get('name')}, mode {results['mode']}"]
    lines += _checks_lines(results.get("checks"))
    lines += _kernels_lines(results.get("kernels"))
    lines += _unet_lines(results.get("unet"))
    lines += _turbo_lines(results.get("turbo"))
    lines += _unet_lines(results.get("sdxl_unet"), "SDXL ")
    lines += _turbo_lines(results.get("sdxl_turbo"))
    lines += _quality_lines(results.get("quality"))
    for section in E2E_SECTIONS:
        vae_prof = (results.get(section) or {}).get("vae_decoder_profile", {})
        if "top" in vae_prof:
            model = results[section].get("model", "SD-Turbo")
            lines.append(
                f"  {model} VAE decoder, batch 8, {vae_prof['variant']}: "
                f"{vae_prof['ms_per_call']:.1f} ms {vae_prof['time']} time; largest:"
            )
            lines += _profile_rows(vae_prof)
    for section, title in UNET_SECTIONS.items():
        for name, error in (results.get(section) or {}).get("variant_errors", {}).items():
            lines.append(f"ERROR in {title}variant {name}: {error.strip().splitlines()[-1]}")
    lines += _choices_lines(results.get("kernel_choices"))
    for section, error in results.get("errors", {}).items():
        lines.append(f"ERROR in section {section}: {error.strip().splitlines()[-1]}")
    lines += _targets_lines(results.get("targets", {}))
    lines.append(f"sections (s): {results['section_s']}; all checks ok: {results['checks_ok']}")
    return "\n".join(lines)


def _profile_rows(profile: dict[str, Any]) -> list[str]:
    """The 8 largest kernels (or ops) of a profile_by_kernel table."""
    return [
        f"    {k['share']:5.1%} {k['ms_per_call']:7.3f} ms  {k['name'][:90]}"
        for k in profile["top"][:8]
    ]


def _checks_lines(checks: dict[str, Any] | None) -> list[str]:
    if not checks:
        return []
    lines = ["checks (err <= 2·err_torch + floor):"]
    for c in checks["kernels"]:
        lines.append(
            f"  {c['op']:<16} {c['name']:<40} err {c['err']:.3g}  torch "
            f"{c['err_torch_same_precision']:.3g}  tol {c['tol']:.3g}  "
            f"{'ok' if c['ok'] else 'FAIL'}"
        )
    in_graph = checks.get("grid_sync_in_cuda_graph")
    if in_graph:
        lines.append(
            f"  group_norm_silu  grid sync in a CUDA graph, {in_graph['replays']} replays "
            f"= eager: {'ok' if in_graph['ok'] else 'FAIL: ' + in_graph['error']}"
        )
    return lines


def _kernels_lines(kern: dict[str, Any] | None) -> list[str]:
    if not kern:
        return []
    copy = kern["copy"]
    lines = [
        f"kernels ({kern['dtype']}), p50 ms; copy of {copy['bytes'] / 2**20:.0f} MiB: "
        f"{copy['gb_per_s']:.0f} GB/s:"
    ]
    for r in kern["group_norm"]:
        lines += _group_norm_lines(r)
    for r in kern["attention"]:
        lines += _attention_lines(r)
    for r in kern.get("upsample_conv", []):
        lines.append(
            f"  upsample+conv {r['name']:<28} fused {r['ms']['fused']:7.3f}"
            f"  torch {r['ms']['torch']:7.3f}  x{r['speedup']:.2f}"
        )
    rowwise = [(name, r) for name in ("geglu", "layer_norm") for r in kern.get(name, [])]
    for op, r in rowwise:
        lines.append(
            f"  {op:<10} {r['name']:<31} kernel {r['ms']['kernel']:7.3f} "
            f"({r['kernel_gb_per_s']:6.0f} GB/s, {r['fraction_of_copy']:.0%} of a copy)"
            f"  torch {r['ms']['torch']:7.3f}  x{r['speedup']:.2f}"
        )
    return lines


def _group_norm_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        f"  group_norm+silu {r['name']:<26} eager launch: kernel "
        f"{r['kernel_ms']['p50']:7.3f}"
        f" ({r['kernel_gb_per_s']:6.0f} GB/s)  torch {r['torch_ms']['p50']:7.3f}"
        f"  x{r['speedup']:.2f}"
    ]
    if "graphed_ms" in r:
        g = r["graphed_ms"]
        lines.append(
            f"  {'':<16}{'':<26} in a graph:   kernel {g['kernel']:7.3f}"
            f" ({r['graphed_kernel_gb_per_s']:6.0f} GB/s, "
            f"{r['graphed_fraction_of_copy']:.0%} of a copy)  torch {g['torch']:7.3f}"
            f"  x{r['graphed_speedup']:.2f}"
        )
    if "launch_sweep" in r:
        best = r["launch_sweep"]["best"]
        plan = best["plan"]
        per_sm = best["programs_per_sm"]
        lines.append(
            f"  {'':<42} best launch: {best['form']}, split {plan['split']}"
            f"{f' ({per_sm} programs/SM)' if per_sm else ''}, {plan['groups_per_program']} "
            f"groups × {plan['block_c']} channels × {plan['block_s']} positions per "
            f"tile, {best.get('warps') or 4} warps: {best['graphed_ms']:.4f} ms "
            f"(default x{r['launch_sweep']['default_over_best']:.2f} slower)"
        )
    return lines


def _attention_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        f"  attention {r['name']:<32} eager launch: kernel {r['kernel_ms']['p50']:7.3f}"
        f"  sdpa {r['torch_ms']['p50']:7.3f}"
    ]
    if "graphed_ms" in r:
        g = r["graphed_ms"]
        lines.append(
            f"  {'':<10}{'':<32} in a graph:   kernel {g['kernel']:7.3f}"
            f" ({r['graphed_kernel_tflop_per_s']:5.0f} TFLOP/s)  best SDPA"
            f" ({r['sdpa_best_backend']}) {g['sdpa_best']:7.3f}"
            f" ({r['graphed_sdpa_best_tflop_per_s']:5.0f} TFLOP/s)"
            f"  x{r['graphed_speedup_vs_sdpa_best']:.2f}"
        )
    split = r["head_dim_blocks"]
    lines.append(
        f"  {'':<42} head dim as {split['split']}: {split['split_ms']:7.3f}, one padded "
        f"block {split['padded']}: {split['padded_ms']:7.3f}"
        f"  x{split['padded_over_split']:.2f}"
    )
    return lines


def _unet_lines(unet: dict[str, Any] | None, model: str = "") -> list[str]:
    if not unet:
        return []
    lines = [f"{model}U-Net step {unet['latent']} {unet['dtype']}, p50 / p90 ms:"]
    for name, r in unet["variants"].items():
        extra = f"  {r['tflop_per_s']:4.0f} TFLOP/s" if "tflop_per_s" in r else ""
        extra += f"  compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
        lines.append(
            f"  {name:<26} {r['p50']:8.2f} / {r['p90']:8.2f}  x{r['speedup_vs_eager']:.2f}{extra}"
        )
    if unet.get("left_out"):
        lines.append(f"  left out (--sdxl-compile runs them): {', '.join(unet['left_out'])}")
    prof = unet.get("profile", {})
    if "top" in prof:
        lines.append(
            f"  profile of {prof['variant']}: {prof['ms_per_call']:.2f} ms {prof['time']} "
            "time per call; largest:"
        )
        lines += _profile_rows(prof)
    for name, c in unet["checks"].items():
        verdict = "ok" if c["ok"] else "FAIL"
        lines.append(f"  check {name:<26} err {c['err']:.3g} tol {c['tol']:.3g} {verdict}")
    return lines


def _turbo_lines(turbo: dict[str, Any] | None) -> list[str]:
    if not turbo:
        return []
    lines = [f"{turbo.get('model', 'SD-Turbo')} end to end, p50 ms (img/s):"]
    for batch, rows in turbo["batches"].items():
        for name, r in rows.items():
            if name.startswith("max_abs"):
                continue
            stages = r.get("stages_ms_p50")
            stage_text = (
                "  [" + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + "]" if stages else ""
            )
            lines.append(
                f"  b{batch:<3} {name:<16} {r['p50']:9.2f} ({r['images_per_s']:7.1f} img/s)"
                f"  x{r['speedup_vs_diffusers']:.2f}{stage_text}"
            )
    return lines


def _quality_lines(quality: dict[str, Any] | None) -> list[str]:
    if not quality:
        return []
    lines = [f"default model, LCM 4 steps, {quality['prompts']} prompts, fully correct:"]
    for name, row in quality["rows"].items():
        lines.append(
            f"  torch {name:<18} single {row['single']['correct']:.1%}  two "
            f"{row['two']['correct']:.1%}  max |image - fp32| "
            f"{row['max_abs_image_diff_vs_fp32']:.3f}"
        )
    return lines


def _choices_lines(choices: list[dict[str, Any]] | None) -> list[str]:
    if not choices:
        return []
    lines = ["tuned ops, per shape: the choice, then each candidate's ms per call:"]
    for c in choices:
        shapes = " ".join("x".join(map(str, s)) for s in c["shapes"] if isinstance(s, list))
        times = "  ".join(f"{name} {ms:.4f}" for name, ms in c["ms"].items())
        times += f"  (failed: {', '.join(c['failed'])})" if c["failed"] else ""
        lines.append(f"  {c['op']:<13} {shapes:<34} {c['layout']:<7} {c['chosen']:<17} {times}")
    return lines


def _targets_lines(goals: dict[str, Any]) -> list[str]:
    lines = []
    if goals:
        lines.append(f"targets (sections took {goals['sections_s']['sum']:.0f} s):")
    for name in ("group_norm_of_copy", "attention_vs_sdpa_best"):
        if name in goals:
            g = goals[name]
            lines.append(
                f"  {name:<24} >= {g['target']}: met in {g['met']} of {g['cases']} cases "
                f"(from {g['min']:.2f} to {g['max']:.2f})"
            )
    if "unet_ms" in goals:
        g = goals["unet_ms"]
        lines.append(
            f"  U-Net step <= {g['target']} ms: {_default_and_best(g)}: "
            f"{'met' if g['met'] else 'not met'}"
        )
    if "sdxl_unet_ms" in goals:
        g = goals["sdxl_unet_ms"]
        eager = f"{g['diffusers_eager']:.2f}" if g["diffusers_eager"] is not None else "-"
        lines.append(
            f"  SDXL U-Net step (no target): {_default_and_best(g)}; diffusers eager {eager}"
        )
    return lines


def _default_and_best(goal: dict[str, Any]) -> str:
    default = f"{goal['default']:.2f}" if goal["default"] is not None else "-"
    best = goal["best"]
    return f"default {default}, best {best['p50']:.2f} ({best['variant']})"


# fewstep's performance targets on an H100, fp16: GroupNorm+SiLU at >= 75% of a copy of the same
# tensor, attention at least as fast as SDPA's best backend, the U-Net step <= 6 ms, the
# whole suite (setup included) within 8 minutes.
TARGETS = {
    "group_norm_of_copy": 0.75,
    "attention_vs_sdpa_best": 1.0,
    "unet_ms": 6.0,
    "suite_s": 480,
}


def target_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Each target against what this run measured (device time in CUDA graphs); nothing for
    a run on the CPU."""
    if results.get("mode") != "gpu":
        return {}

    def against(values: list[float], target: float) -> dict[str, Any]:
        met = sum(v >= target for v in values)
        return {"target": target, "met": met, "cases": len(values), "min": min(values)}

    kern = results.get("kernels") or {}
    out: dict[str, Any] = {}
    gn = [r["graphed_fraction_of_copy"] for r in kern.get("group_norm", []) if "graphed_ms" in r]
    if gn:
        out["group_norm_of_copy"] = {**against(gn, TARGETS["group_norm_of_copy"]), "max": max(gn)}
    attn = [
        r["graphed_speedup_vs_sdpa_best"] for r in kern.get("attention", []) if "graphed_ms" in r
    ]
    if attn:
        out["attention_vs_sdpa_best"] = {
            **against(attn, TARGETS["attention_vs_sdpa_best"]),
            "max": max(attn),
        }
    unet = _fewstep_step_ms(results.get("unet"))
    if unet:
        met = unet["best"]["p50"] <= TARGETS["unet_ms"]
        out["unet_ms"] = {"target": TARGETS["unet_ms"], **unet, "met": met}
    sdxl = _fewstep_step_ms(results.get("sdxl_unet"))
    if sdxl:  # no target is set for SDXL: reported beside the targets, against diffusers
        eager = results["sdxl_unet"]["variants"].get("diffusers_eager", {}).get("p50")
        out["sdxl_unet_ms"] = {**sdxl, "diffusers_eager": eager}
    out["sections_s"] = {"target": TARGETS["suite_s"], "sum": sum(results["section_s"].values())}
    return out


def _fewstep_step_ms(unet: dict[str, Any] | None) -> dict[str, Any] | None:
    """A U-Net step's fewstep variants: the default's p50 and the best one's; None without
    any."""
    variants = (unet or {}).get("variants", {})
    ours = {name: row["p50"] for name, row in variants.items() if name.startswith("fewstep")}
    if not ours:
        return None
    best = min(ours, key=ours.__getitem__)
    return {"default": ours.get("fewstep"), "best": {"variant": best, "p50": ours[best]}}


def all_checks_ok(results: dict[str, Any]) -> bool:
    """Every check passed and no section failed."""
    oks = [not results.get("errors")]
    oks += [c["ok"] for c in results.get("checks", {}).get("kernels", [])]
    oks += [results.get("checks", {}).get("grid_sync_in_cuda_graph", {}).get("ok", True)]
    for section in UNET_SECTIONS:
        oks += [c["ok"] for c in results.get(section, {}).get("checks", {}).values()]
        oks += [not results.get(section, {}).get("variant_errors")]
    return all(oks)
