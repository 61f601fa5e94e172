"""Procedural scenes with captions, and an analyzer that reads an image back into attributes.

The dataset of fewstep's default model and its quality yardstick, in numpy (pillow only to
open files), so the quality checks (tests, the quality report, the benchmarks) need nothing
heavier. No inference path uses it: it lives with the training scripts, not in the installed
package.

A scene is a 64x64 RGB image: a background colour and one or two objects. Each object has a
shape (`SHAPES`), a colour (`COLORS`, the eight corners of the RGB cube, so every two palette
colours are at least 255 apart), a size (`SIZES`: the side of its bounding box in pixels), a
position on a 3x3 grid (`POSITIONS`) and a small integer jitter. All colours of a scene
differ, and the objects of a two-object scene never touch, so the analyzer can find each
object by its colour alone.

Rendering is exact rasterization at pixel centres (pixel (i, j) is inside a shape when the
point (j + 0.5, i + 0.5) is): no anti-aliasing, so a dataset image holds palette colours only
and the analyzer reads it back exactly.

Captions follow one small grammar, which `parse_caption` inverts:

    scene    := object [" and " object] [" on a " COLOR " background"]
    object   := "a " [SIZE " "] COLOR " " SHAPE [" " PLACE]
    PLACE    := "at the top left" | "at the top" | "on the left" | "in the center" | ...

e.g. "a red circle on a blue background", "a small yellow square at the top left",
"a green triangle and a red circle". Which optional parts a caption says is part of the
scene (`Scene.say_size`, `say_position`, `say_background`), so `caption(scene)` is a pure
function and `parse_caption(caption(scene)) == scene_target(scene)`.

The analyzer (`analyze`) labels each pixel with the nearest palette colour (or none, when it
is farther than `MAX_COLOR_DISTANCE` from all of them, as blended edge pixels of a generated
image are), takes the most frequent label as the background, splits every other colour into
8-connected components, drops components smaller than `MIN_OBJECT_AREA`, and describes each
remaining one: shape = the template (rendered by the same rasterizer at the component's
bounding box) with the highest IoU, size = the nearer of `SIZES` to the bounding-box side,
position = the grid cell of the bounding-box centre. `score` compares that with what a prompt
(or a scene) asks for.

Limits: 64x64 images only; the analyzer knows this palette and these shapes, nothing else;
objects of the same colour that touch count as one.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

IMAGE_SIZE = 64

# The eight corners of the RGB cube: every pair is >= 255 apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOR_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # [8, 3]

SHAPES = ("circle", "square", "triangle", "cross", "ring")
SIZES: dict[str, int] = {"small": 14, "large": 22}  # side of the bounding box, pixels
SIZE_NAMES = tuple(SIZES)

# 3x3 grid, row-major; cell centres at 13, 32, 51 px (+- MAX_JITTER: always inside the cell,
# and a large object stays inside the image).
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
_GRID_CENTERS = (13, 32, 51)
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
MAX_JITTER = 2  # pixels, each axis
MIN_GAP = 2  # pixels between the bounding boxes of two objects

# Every word a caption can use: the tokenizer of the default model makes each one token.
CAPTION_WORDS = tuple(
    dict.fromkeys(
        ("a", "and", "on", "at", "in", "the", "background")
        + COLOR_NAMES
        + SHAPES
        + SIZE_NAMES
        + tuple(w for p in POSITIONS for w in p.split())
    )
)

# Analyzer thresholds (64x64 images).
MAX_COLOR_DISTANCE = 100.0  # RGB distance to the nearest palette colour; farther = no colour
MIN_OBJECT_AREA = 40  # pixels; the smallest object (a small triangle) covers 98
_SIDE_SEARCH = 4  # the analyzer fits sides from the bounding box's to this many pixels more
_RING_INNER = 0.5  # inner radius / outer radius
_CROSS_ARM = 1.0 / 3.0  # arm width / side


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str
    jitter: tuple[int, int] = (0, 0)  # (dx, dy) pixels

    @property
    def center(self) -> tuple[float, float]:
        index = POSITIONS.index(self.position)
        row, col = divmod(index, 3)
        return (_GRID_CENTERS[col] + self.jitter[0], _GRID_CENTERS[row] + self.jitter[1])

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in continuous pixel coordinates."""
        cx, cy = self.center
        half = SIZES[self.size] / 2
        return (cx - half, cy - half, cx + half, cy + half)


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    # What the caption says besides colour and shape.
    say_size: bool = False
    say_position: bool = False
    say_background: bool = True


@dataclasses.dataclass(frozen=True)
class ObjectTarget:
    color: str
    shape: str
    size: str | None = None  # None: the prompt does not say
    position: str | None = None


@dataclasses.dataclass(frozen=True)
class Target:
    """What a prompt asks for; None fields are not checked."""

    objects: tuple[ObjectTarget, ...]
    background: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    kind: str  # "single" | "two"
    prompt: str
    target: Target


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_PIXEL_CENTERS = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """bool [size, size]: the pixels whose centres lie inside `shape` of bounding box `side`
    centred at (cx, cy). Edges are inclusive."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    coords = _PIXEL_CENTERS if size == IMAGE_SIZE else np.arange(size, dtype=np.float32) + 0.5
    dx = np.abs(coords[None, :] - cx)  # [1, W]
    y = coords[:, None] - cy  # [H, 1]
    dy = np.abs(y)
    half = side / 2
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (dx <= half) & (dy <= half)
    if shape == "triangle":  # apex up at (cx, cy - half), base along y = cy + half
        return (y <= half) & (dx <= (y + half) / 2)
    if shape == "cross":
        arm = side * _CROSS_ARM / 2
        return ((dx <= arm) & (dy <= half)) | ((dy <= arm) & (dx <= half))
    # ring
    r2 = dx**2 + dy**2
    return (r2 <= half**2) & (r2 >= (_RING_INNER * half) ** 2)


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 [64, 64, 3]: the background, then each object in order."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = COLORS[scene.background]
    for obj in scene.objects:
        cx, cy = obj.center
        image[shape_mask(obj.shape, cx, cy, SIZES[obj.size])] = COLORS[obj.color]
    return image


# ---------------------------------------------------------------------------------------------
# Sampling and captions
# ---------------------------------------------------------------------------------------------


def _apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    return (
        ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0
    )


def _sample_object(rng: np.random.Generator, color: str, taken: tuple[str, ...]) -> SceneObject:
    free = [p for p in POSITIONS if p not in taken]
    shape = SHAPES[rng.integers(len(SHAPES))]  # draw order is part of the dataset: keep it
    size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
    position = free[rng.integers(len(free))]
    dx, dy = (int(v) for v in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))
    return SceneObject(shape=shape, color=color, size=size, position=position, jitter=(dx, dy))


def sample_spec(
    rng: np.random.Generator,
    num_objects: int | None = None,
    p_two: float = 0.5,
    p_say_size: float = 0.5,
    p_say_position: float = 0.5,
    p_say_background: float = 0.8,
) -> Scene:
    """Draw a scene: one object (or two with probability p_two), all colours distinct, two
    objects placed apart; which optional parts its caption says, with the given odds."""
    if num_objects is None:
        num_objects = 2 if rng.random() < p_two else 1
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    colors = rng.permutation(len(COLOR_NAMES))[: num_objects + 1]
    background = COLOR_NAMES[colors[0]]
    objects = [_sample_object(rng, COLOR_NAMES[colors[1]], ())]
    if num_objects == 2:
        # Rejection: two objects must not touch. Both are redrawn, since some first objects (a
        # large one in the center) leave almost no room; 72% of the draws succeed.
        while True:
            second = _sample_object(rng, COLOR_NAMES[colors[2]], (objects[0].position,))
            if _apart(objects[0], second):
                break
            objects = [_sample_object(rng, COLOR_NAMES[colors[1]], ())]
        objects.append(second)
    return Scene(
        background=background,
        objects=tuple(objects),
        say_size=bool(rng.random() < p_say_size),
        say_position=bool(rng.random() < p_say_position),
        say_background=bool(rng.random() < p_say_background),
    )


def scene_at(index: int, seed: int = 0) -> Scene:
    """Scene `index` of the dataset with `seed`: random access, the same on every machine."""
    return sample_spec(np.random.default_rng((seed, index)))


def _object_phrase(obj: ObjectTarget) -> str:
    words = ["a"]
    if obj.size is not None:
        words.append(obj.size)
    words += [obj.color, obj.shape]
    if obj.position is not None:
        words.append(POSITION_PHRASES[obj.position])
    return " ".join(words)


def target_caption(target: Target) -> str:
    text = " and ".join(_object_phrase(o) for o in target.objects)
    if target.background is not None:
        text += f" on a {target.background} background"
    return text


def scene_target(scene: Scene, full: bool = False) -> Target:
    """What the scene's caption says (full=True: every attribute, the ground truth)."""
    objects = tuple(
        ObjectTarget(
            color=o.color,
            shape=o.shape,
            size=o.size if full or scene.say_size else None,
            position=o.position if full or scene.say_position else None,
        )
        for o in scene.objects
    )
    background = scene.background if full or scene.say_background else None
    return Target(objects=objects, background=background)


def caption(scene: Scene) -> str:
    return target_caption(scene_target(scene))


_ALT = "|".join
_OBJECT_RE = re.compile(
    rf"an? (?:(?P<size>{_ALT(SIZE_NAMES)}) )?(?P<color>{_ALT(COLOR_NAMES)}) "
    rf"(?P<shape>{_ALT(SHAPES)})"
    rf"(?: (?:at|on|in) the (?P<position>{_ALT(sorted(POSITIONS, key=len, reverse=True))}))?"
)
_BACKGROUND_RE = re.compile(rf" on an? (?P<bg>{_ALT(COLOR_NAMES)}) background$")


def parse_caption(text: str) -> Target:
    """Invert the caption grammar (case and extra spaces ignored); ValueError otherwise."""
    clean = " ".join(text.lower().replace(",", " ").split())
    background = None
    match = _BACKGROUND_RE.search(clean)
    body = clean
    if match:
        background = match.group("bg")
        body = clean[: match.start()]
    objects = []
    for part in body.split(" and "):
        m = _OBJECT_RE.fullmatch(part)
        if m is None:
            raise ValueError(
                f"prompt must follow the scene grammar ('a [small|large] COLOR SHAPE [at the "
                f"POSITION] [and ...] [on a COLOR background]'), got {text!r}"
            )
        objects.append(ObjectTarget(m["color"], m["shape"], m["size"], m["position"]))
    return Target(objects=tuple(objects), background=background)


def evaluation_prompts() -> tuple[EvalPrompt, ...]:
    """The fixed prompt set of the quality report: 60 single-object prompts (every shape 12
    times; background always said, size and position each in half of them, crossed) and 40
    two-object prompts (background always said, positions in half)."""
    rng = np.random.default_rng(20_240_601)
    prompts = []
    for i in range(60):
        scene = sample_spec(rng, num_objects=1)
        obj = dataclasses.replace(scene.objects[0], shape=SHAPES[i % len(SHAPES)])
        scene = dataclasses.replace(
            scene,
            objects=(obj,),
            say_size=bool(i // 5 % 2),
            say_position=bool(i // 10 % 2),
            say_background=True,
        )
        target = scene_target(scene)
        prompts.append(EvalPrompt("single", target_caption(target), target))
    for i in range(40):
        scene = sample_spec(rng, num_objects=2)
        scene = dataclasses.replace(
            scene, say_size=False, say_position=bool(i % 2), say_background=True
        )
        target = scene_target(scene)
        prompts.append(EvalPrompt("two", target_caption(target), target))
    return tuple(prompts)


# ---------------------------------------------------------------------------------------------
# Analyzer
# ---------------------------------------------------------------------------------------------


def _as_uint8_image(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"image must be uint8 or float in 0..1, got dtype {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"image must have shape ({IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {array.shape}"
        )
    return array


def color_labels(image: Any) -> np.ndarray:
    """int [64, 64]: index into COLOR_NAMES of each pixel's nearest palette colour, -1 where
    the nearest one is farther than MAX_COLOR_DISTANCE."""
    pixels = _as_uint8_image(image).astype(np.float32)
    dist2 = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)  # [64, 64, 8]
    labels = dist2.argmin(-1)
    too_far = dist2.min(-1) > MAX_COLOR_DISTANCE**2
    return np.where(too_far, -1, labels)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a bool mask, each as an [N, 2] array of (row, col)."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    out = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        pixels: list[tuple[int, int]] = []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr, dc in itertools.product((-1, 0, 1), repeat=2):
                rr, cc = r + dr, c + dc
                if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(np.array(pixels))
    return out


def _describe(pixels: np.ndarray, color: str) -> dict[str, Any]:
    rows, cols = pixels[:, 0], pixels[:, 1]
    x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bbox_side = max(x1 - x0, y1 - y0)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[rows, cols] = True
    # Fit every template at the bounding box's centre over a few sides: a soft generated
    # edge loses pixels where the palette colour blends into the background (most at a
    # triangle's apex and base corners), so the bounding box can be up to 4 px small.
    fits = {}
    for shape in SHAPES:
        for side in range(bbox_side, bbox_side + _SIDE_SEARCH + 1):
            template = shape_mask(shape, cx, cy, side)
            fits[shape, side] = float((mask & template).sum() / (mask | template).sum())
    shape, side = max(fits, key=fits.__getitem__)
    size = min(SIZE_NAMES, key=lambda s: abs(SIZES[s] - side))
    col = min(int(cx * 3 // IMAGE_SIZE), 2)
    row = min(int(cy * 3 // IMAGE_SIZE), 2)
    return {
        "color": color,
        "shape": shape,
        "size": size,
        "position": POSITIONS[row * 3 + col],
        "area": int(len(pixels)),
        "bbox": (int(x0), int(y0), int(x1), int(y1)),
        "shape_iou": fits[shape, side],
    }


def analyze(image: Any) -> dict[str, Any]:
    """Read an image back into attributes.

    image: uint8 [64, 64, 3], float [64, 64, 3] in 0..1, or a PIL image.
    Returns {"background": colour name or None, "objects": [{"color", "shape", "size",
    "position", "area", "bbox" (x0, y0, x1, y1), "shape_iou"}, ...]} with objects largest
    first.
    """
    labels = color_labels(image)
    counts = np.bincount(labels[labels >= 0], minlength=len(COLOR_NAMES))
    if counts.sum() == 0:
        return {"background": None, "objects": []}
    bg_index = int(counts.argmax())
    objects = []
    for index, name in enumerate(COLOR_NAMES):
        if index == bg_index or counts[index] < MIN_OBJECT_AREA:
            continue
        for pixels in _components(labels == index):
            if len(pixels) >= MIN_OBJECT_AREA:
                objects.append(_describe(pixels, name))
    objects.sort(key=lambda o: (-o["area"], o["bbox"]))
    return {"background": COLOR_NAMES[bg_index], "objects": objects}


OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")
MAX_MATCHED_OBJECTS = 6  # only the largest detections take part in matching


def score(image: Any, prompt_or_spec: str | Scene | Target) -> dict[str, Any]:
    """Score an image against what a prompt (or scene, all its attributes) asks for.

    Expected objects are matched to detected ones by the assignment that gets the most
    attributes right (so "a green triangle and a red circle" drawn as a red triangle and a
    green circle gets colour or shape wrong, never both right).

    Returns {"correct": bool (every checked attribute right and no extra or missing object),
    "count": bool, "background": bool or None (not checked), and for each of
    OBJECT_ATTRIBUTES a list with one bool per object whose attribute is checked}.
    """
    if isinstance(prompt_or_spec, str):
        target = parse_caption(prompt_or_spec)
    elif isinstance(prompt_or_spec, Scene):
        target = scene_target(prompt_or_spec, full=True)
    elif isinstance(prompt_or_spec, Target):
        target = prompt_or_spec
    else:
        raise ValueError(
            f"prompt_or_spec must be a str, Scene or Target, got {type(prompt_or_spec).__name__}"
        )
    found = analyze(image)
    detected = found["objects"][:MAX_MATCHED_OBJECTS]

    def checks(want: ObjectTarget, got: dict[str, Any] | None) -> dict[str, bool]:
        return {
            attr: got is not None and got[attr] == getattr(want, attr)
            for attr in OBJECT_ATTRIBUTES
            if getattr(want, attr) is not None
        }

    def n_right(result: list[dict[str, bool]]) -> int:
        return sum(sum(r.values()) for r in result)

    slots: list[dict[str, Any] | None] = list(detected)
    slots += [None] * max(0, len(target.objects) - len(detected))
    assignments = (
        [checks(want, got) for want, got in zip(target.objects, chosen, strict=True)]
        for chosen in itertools.permutations(slots, len(target.objects))
    )
    best = max(assignments, key=n_right)  # the first of equals: deterministic
    out: dict[str, Any] = {attr: [] for attr in OBJECT_ATTRIBUTES}
    for result in best:
        for attr, ok in result.items():
            out[attr].append(ok)
    out["count"] = len(found["objects"]) == len(target.objects)
    out["background"] = (
        None if target.background is None else found["background"] == target.background
    )
    out["correct"] = bool(
        out["count"]
        and out["background"] is not False
        and all(all(out[attr]) for attr in OBJECT_ATTRIBUTES)
    )
    return out


def attribute_accuracy(scores: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Fraction right of each attribute (and "correct", "count") over many `score` results."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for s in scores:
        values = {"correct": [s["correct"]], "count": [s["count"]]}
        if s["background"] is not None:
            values["background"] = [s["background"]]
        values.update({attr: s[attr] for attr in OBJECT_ATTRIBUTES})
        for key, oks in values.items():
            right[key] = right.get(key, 0) + sum(bool(v) for v in oks)
            total[key] = total.get(key, 0) + len(oks)
    return {key: right[key] / total[key] for key in total if total[key]}
