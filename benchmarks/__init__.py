"""fewstep.benchmarks: every benchmark of fewstep, and `harness.py`, what they share.

`pipeline_bench.py` is `fewstep bench` (fewstep's backends against diffusers);
`kernels_bench.py`, `lora_bench.py` and `gpu_suite.py` (run by `gpu_suite.sh`) run as scripts
or modules; `default_model_grid.py` and the GPU suite's quality section read the scenes
analyzer from `training/`, so they run from a source checkout. `results/` holds the JSON and
pictures of past runs: data of the repository, not installed.
"""
