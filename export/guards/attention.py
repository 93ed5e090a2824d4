"""The one guarded attention function that carries align, ptr and oh into every family.

Registered with transformers' `AttentionInterface` under `GUARDED_ATTENTION`; the decoder
passes an `AttentionGuard` per layer call through the layers' `**kwargs`. Eager math on
purpose: the guards need the attention logits, which fused SDPA never exposes. Inside
`recording()` every guard that reaches the function is noted, so the exporter can prove each
one arrived (a family whose layers drop the keyword must fail the export, not export unguarded).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from vlmguard.guards import OH_MUTE_SCALE

GUARDED_ATTENTION = "vlmguard_guarded"
_reached: list[AttentionGuard] | None = None  # guards seen inside `recording()`


@dataclass
class AttentionGuard:
    """Per-call guard tensors; `None` fields add no compute."""

    align_gamma: torch.Tensor | None = None  # [] strength for this layer (0 = off)
    align_calibrated: torch.Tensor | None = None  # [B, 1, Q, K] bool: query after prefix, key in it
    blocked_keys: torch.Tensor | None = None  # [B, K] bool: SafePTR-pruned keys
    muted_head: int | torch.Tensor | None = None  # Oh: head (or [B] per-row heads) muted


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand grouped KV heads to one per query head."""
    if groups == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    states = states[:, :, None].expand(batch, kv_heads, groups, length, dim)
    return states.reshape(batch, kv_heads * groups, length, dim)


def guarded_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor,
    guard: AttentionGuard | None,
) -> torch.Tensor:
    """Scaled attention logits with the guards applied and disallowed keys at the dtype minimum."""
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if guard is not None and isinstance(guard.muted_head, torch.Tensor):
        heads = torch.arange(logits.shape[1], device=logits.device)
        muted = heads[None, :] == guard.muted_head.to(logits.device)[:, None]  # [B, H]
        scale = torch.where(muted, OH_MUTE_SCALE, 1.0).to(logits.dtype)
        logits = logits * scale[:, :, None, None]  # a different head muted in each row
    elif guard is not None and guard.muted_head is not None:
        head = guard.muted_head
        scale = torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
        scale[head] = OH_MUTE_SCALE
        logits = logits * scale[None, :, None, None]  # same as scaling that head's query
    if guard is not None and guard.align_gamma is not None:
        boost = guard.align_gamma * torch.relu(logits)
        logits = logits + torch.where(guard.align_calibrated, boost, torch.zeros_like(boost))
    if guard is not None and guard.blocked_keys is not None:
        allowed = allowed & ~guard.blocked_keys[:, None, None, :]
    return torch.where(allowed, logits, torch.finfo(logits.dtype).min)


def guarded_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    attention_guard: AttentionGuard | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention over a boolean `allowed` mask [B, 1, Q, K] with the guards applied."""
    groups = module.num_key_value_groups
    key = repeat_kv(key, groups)
    value = repeat_kv(value, groups)
    if attention_mask is None:
        attention_mask = torch.ones(
            query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device
        )[None, None]
    if _reached is not None and attention_guard is not None:
        _reached.append(attention_guard)
    logits = guarded_logits(query, key, scaling, attention_mask, attention_guard)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


@contextmanager
def recording() -> Iterator[list[AttentionGuard]]:
    """Collect every guard that reaches the attention function while the block runs."""
    global _reached
    _reached = []
    try:
        yield _reached
    finally:
        _reached = None


AttentionInterface.register(GUARDED_ATTENTION, guarded_attention)
