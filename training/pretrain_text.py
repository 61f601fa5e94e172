"""Pretrain the CLIP text encoder to spell out every attribute a caption says, before the
U-Net trains against it frozen (as SD trains against a frozen CLIP).

Why: trained jointly with the U-Net from scratch, the encoder kept colours apart but let
shape and position words collapse (second default run: the pad-token states of captions that
differ only in the position words differed by 0.34 on average, a shape word 0.40, a colour
word 3.2, at norms ~9.8; generated objects landed wherever the noise put them, whatever the
prompt said).
Early on the U-Net can only use colour; the other words are noise to it, and the joint
gradient makes the encoder drop them before the U-Net is able to use them.

The objective: linear heads read, from every token state from the first <|endoftext|> on
(the pad states the U-Net's cross-attention mostly sees, each a summary of the whole caption
in a causal encoder), the background colour and, per object slot, colour, shape, size and
position, each with a "not said" class. Captions come from the U-Net's own scene stream
(`scene_at(i, data_seed)`), a fraction dropped to "" as the U-Net's are. The heads are thrown
away.
"""

from __future__ import annotations

import torch

from training import common, scenes

# label groups: (name, classes); the extra last class of each is "not said" / "no object"
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("background", scenes.COLOR_NAMES),
    *(
        (f"object{slot}.{attr}", values)
        for slot in (0, 1)
        for attr, values in (
            ("color", scenes.COLOR_NAMES),
            ("shape", scenes.SHAPES),
            ("size", scenes.SIZE_NAMES),
            ("position", scenes.POSITIONS),
        )
    ),
)


def caption_labels(target: scenes.Target | None) -> list[int]:
    """One class index per group of GROUPS for what a caption says (None: the "" caption)."""
    said: dict[str, str | None] = {"background": target.background if target else None}
    objects = target.objects if target else ()
    for slot in (0, 1):
        obj = objects[slot] if slot < len(objects) else None
        for attr in ("color", "shape", "size", "position"):
            said[f"object{slot}.{attr}"] = getattr(obj, attr) if obj else None
    return [
        len(values) if said[name] is None else values.index(said[name]) for name, values in GROUPS
    ]


def caption_batch(step: int, batch_size: int, seed: int, data_seed: int, dropout: float):
    """Captions of scenes step*B .. step*B+B-1 (a `dropout` fraction dropped to ""), and their
    labels [B, G]."""
    drop = torch.rand(batch_size, generator=common.step_generator(seed, step)) < dropout
    captions, labels = [], []
    first = step * batch_size
    for i, dropped in zip(range(first, first + batch_size), drop.tolist(), strict=True):
        target = None if dropped else scenes.scene_target(scenes.scene_at(i, data_seed))
        captions.append(scenes.target_caption(target) if target else "")
        labels.append(caption_labels(target))
    return captions, torch.tensor(labels)


def summary_states(text_encoder, ids: torch.Tensor, eos_id: int):
    """Token states from each row's first <|endoftext|> on: [N, C], and their row index [N]."""
    states = text_encoder(ids).last_hidden_state  # [B, 77, C]
    first_eos = (ids == eos_id).int().argmax(dim=1)  # [B]
    mask = torch.arange(ids.shape[1]) >= first_eos[:, None]  # [B, 77]
    rows = torch.arange(ids.shape[0])[:, None].expand_as(mask)[mask]
    return states[mask], rows


class Heads(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.sizes = [len(values) + 1 for _, values in GROUPS]
        self.linear = torch.nn.Linear(width, sum(self.sizes))

    def forward(self, states: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(states).split(self.sizes, dim=-1))


def pretrain(
    text_encoder,
    tokenize,
    eos_id: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    data_seed: int,
    dropout: float,
    note=print,
) -> dict[str, float]:
    """Train `text_encoder` in place; returns the heads' accuracy per group on held-out
    captions (scenes far past the training stream) and "all" (every group of a caption right)."""
    torch.manual_seed(seed)
    heads = Heads(text_encoder.config.hidden_size)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    text_encoder.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = common.lr_at(step, learning_rate, steps // 10, steps, 0.1)
        captions, labels = caption_batch(step, batch_size, seed, data_seed, dropout)
        states, rows = summary_states(text_encoder, tokenize(captions), eos_id)
        logits = heads(states)
        loss = sum(
            torch.nn.functional.cross_entropy(lg, labels[rows, g]) for g, lg in enumerate(logits)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            note(f"text encoder pretraining step {step}/{steps}: loss {loss.item():.4f}")
    text_encoder.eval()
    return accuracy(text_encoder, heads, tokenize, eos_id, seed, data_seed, dropout)


@torch.no_grad()
def accuracy(text_encoder, heads, tokenize, eos_id, seed, data_seed, dropout, count=1024):
    held_out_step = 10**6  # scenes 10**6 * count onwards: never in the training stream
    captions, labels = caption_batch(held_out_step, count, seed, data_seed, dropout)
    states, rows = summary_states(text_encoder, tokenize(captions), eos_id)
    right = torch.stack(
        [lg.argmax(-1) == labels[rows, g] for g, lg in enumerate(heads(states))], dim=1
    )  # [N, G]
    result = {name: right[:, g].float().mean().item() for g, (name, _) in enumerate(GROUPS)}
    result["all"] = right.all(dim=1).float().mean().item()
    return result
