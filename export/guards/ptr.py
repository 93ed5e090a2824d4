"""SafePTR: prune the most deviating tokens inside a layer window, restore them after it.

At the window's first layer each token's deviation 1 - cos(V, R) from the safety instruction's
state R picks the top K% separately among image and instruction tokens; inside the window the
trunk masks those keys, while a restore branch runs the window unpruned; after it, the pruned
positions take the restore branch's states. The chosen mask is an output (`ptr_pruned_mask`)
that decoding feeds back (`ptr_past_pruned_mask`) so the window keeps masking those keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmguard.guards import PTR_REFERENCE_TEXT

from .base import TRUNK, DecoderHook, DecoderStep

RESTORE = "restore"


def ptr_reference(spec: object, model: nn.Module, tokenizer: object, layer: int) -> torch.Tensor:
    """SafePTR's R: the residual stream entering `layer` at the safety instruction's last token."""
    ids = torch.tensor([tokenizer(PTR_REFERENCE_TEXT)["input_ids"]])
    language_model = spec.resolve(model, spec.language_model)
    with torch.no_grad():
        embeds = spec.resolve(model, spec.embed_tokens)(ids)
        states = language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    return states[layer][0, -1].float()


def ptr_select(
    hidden: torch.Tensor,
    reference: torch.Tensor,
    groups: list[torch.Tensor],
    valid: torch.Tensor,
    k_fraction: torch.Tensor,
) -> torch.Tensor:
    """SafePTR's choice [B, S]: per group, the round(K * count) tokens of largest 1 - cos(V, R)."""
    cos = (hidden @ reference) / (hidden.norm(dim=-1) * reference.norm()).clamp_min(1e-12)
    deviation = 1.0 - cos
    chosen = torch.zeros_like(valid, dtype=torch.bool)
    for group in groups:
        member = group.bool() & valid.bool()
        count = member.sum(dim=-1).to(hidden.dtype)
        k = torch.floor(k_fraction.to(hidden.dtype) * count + 0.5)
        score = torch.where(member, deviation, -math.inf)
        order = torch.topk(score, score.shape[-1], dim=-1).indices  # descending
        places = torch.arange(score.shape[-1], device=score.device).expand_as(order)
        rank = torch.empty_like(order).scatter(-1, order, places)
        chosen = chosen | (member & (rank.to(hidden.dtype) < k[:, None]))
    return chosen


class PtrHook(DecoderHook):
    """Prune in the window [start, end) for every branch but the restore branch; then restore."""

    name = "ptr"

    def __init__(self, window: tuple[int, int], reference: torch.Tensor) -> None:
        super().__init__()
        self.start, self.end = window
        self.register_buffer("reference", reference.detach().clone())

    def begin(self, step: DecoderStep) -> None:
        """Nothing is pruned before the window."""
        self.chunk = self.all = self.branch = None

    def before_layer(self, index: int, step: DecoderStep) -> None:
        """At the window's first layer: choose the tokens, open the restore branch."""
        if index != self.start:
            return
        g = step.inputs
        self.chunk = ptr_select(
            step.hidden,
            self.reference,
            [g["ptr_image_mask"], g["ptr_instruction_mask"]],
            step.attention_mask[:, step.past_len :],
            g["ptr_k_fraction"],
        )
        self.all = torch.cat([g["ptr_past_pruned_mask"].bool(), self.chunk], dim=1)
        if step.positions is not None:
            self.branch = step.gather(self.all, 1, keys=True)
            step.branches[RESTORE] = step.gather(step.hidden, 1)

    def attention(self, index: int, branch: str, step: DecoderStep) -> dict[str, object]:
        """Inside the window, pruned keys are blocked everywhere but in the restore branch."""
        if not self.start <= index < self.end or branch == RESTORE:
            return {}
        return {"blocked_keys": self.all if branch == TRUNK else self.branch}

    def after_layer(self, index: int, step: DecoderStep) -> None:
        """After the window's last layer, pruned positions take the restore branch's states."""
        if index != self.end - 1 or RESTORE not in step.branches:
            return
        restore = step.branches.pop(RESTORE)
        restored = step.hidden.index_copy(1, step.positions, restore)
        step.hidden = torch.where(self.chunk[..., None], restored, step.hidden)
        for name, states in step.branches.items():
            step.branches[name] = torch.where(self.branch[..., None], restore, states)

    def outputs(
        self, step: DecoderStep, final: torch.Tensor, norm: nn.Module
    ) -> list[torch.Tensor]:
        """`ptr_pruned_mask` [B, total]: past and newly pruned positions."""
        return [self.all.to(torch.int64)]
