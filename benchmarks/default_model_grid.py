"""The README's picture of the default model: prompts and what it drew for them.

    python benchmarks/default_model_grid.py --output benchmarks/results/default-model-grid.png

Runs the installed default model (fewstep.default_model(), onnxruntime, its own defaults: LCM,
4 steps) on the first prompts of each kind of `training.scenes.evaluation_prompts()` (prompt i,
seed i, as in the quality report) and draws each image enlarged, with its prompt below and a
mark for whether the analyzer read the prompt back from it.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fewstep.benchmarks.harness import import_training
from fewstep.package import default_model
from fewstep.pipeline import Pipeline

# training/ (the dataset and its analyzer) is a folder of the checkout, not installed.
import_training(Path(__file__).resolve().parents[1])
from training import scenes  # noqa: E402

SCALE = 3  # 64 px -> 192 px, nearest neighbour: the pixels are the model's
CAPTION_LINES = 4
LINE_HEIGHT = 12


def draw_grid(cells: list[tuple[np.ndarray, str, bool]], columns: int) -> Image.Image:
    side = scenes.IMAGE_SIZE * SCALE
    cell_h = side + CAPTION_LINES * LINE_HEIGHT + 6
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * (side + 8) + 8, rows * cell_h + 8), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (image, prompt, correct) in enumerate(cells):
        x, y = 8 + (k % columns) * (side + 8), 8 + (k // columns) * cell_h
        tile = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        mark = "[ok] " if correct else "[x] "
        lines = textwrap.wrap(mark + prompt, width=side // 6)[:CAPTION_LINES]
        for i, line in enumerate(lines):
            draw.text((x, y + side + 3 + i * LINE_HEIGHT), line, fill=(0, 0, 0))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/default-model-grid.png")
    parser.add_argument("--per-kind", type=int, default=6, help="prompts of each kind")
    parser.add_argument("--columns", type=int, default=6)
    args = parser.parse_args(argv)

    pipe = Pipeline.from_pretrained(default_model())
    prompts = list(scenes.evaluation_prompts())
    chosen = [i for i, p in enumerate(prompts) if p.kind == "single"][: args.per_kind]
    chosen += [i for i, p in enumerate(prompts) if p.kind == "two"][: args.per_kind]
    cells = []
    start = time.perf_counter()
    for i in chosen:
        image = pipe(prompts[i].prompt, seed=i, output_type="np").images[0]
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        correct = bool(scenes.score(image, prompts[i].target)["correct"])
        cells.append((image, prompts[i].prompt, correct))
    seconds = time.perf_counter() - start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    draw_grid(cells, args.columns).save(args.output)
    right = sum(c for _, _, c in cells)
    print(f"wrote {args.output}: {right}/{len(cells)} read back right, {seconds:.1f} s")


if __name__ == "__main__":
    main()
