"""`fewstep.benchmarks.export_memory` at the small SDXL-layout size: the worker's report and
the parameter counts it reads from safetensors headers, against the loaded modules."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fewstep.benchmarks.export_memory import run  # noqa: E402


def test_small_sdxl_export_is_measured_per_stage(tmp_path):
    results = run("small", ["fp16"], None, tmp_path)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl-small")
    for component, count in results["model"]["parameters"].items():
        module = getattr(pipe, component)
        assert count == sum(p.numel() for p in module.parameters()), component
    report = results["exports"]["fp16"]
    stages = report["peak_rss_gb_by_stage"]
    for stage in ("export text_encoder_2", "export unet", "verify", "write"):
        assert 0 < stages[stage] <= report["peak_rss_gb"], stage
    # the manifest is written inside the write stage: it records the stages before it
    assert set(report["stage_seconds"]) == set(stages) - {"start", "write"}
    assert report["package_gb"] > 0
    assert not (tmp_path / "package-fp16").exists()  # each package is removed once measured
