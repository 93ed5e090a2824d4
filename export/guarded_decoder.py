"""The guarded decoder: a language model's layers with the in-model guards, ready to trace.

One module serves every family: it drives the family's own decoder layers (resolved by the
family spec) with the guarded attention function, a KV cache given as plain tensors, and two
side branches that run only over `guard_positions` (the whole chunk at prefill, nothing at
decode, so decode never pays for them):

- SafePTR's restore branch: the window layers without pruning; after the window, pruned
  positions take its hidden states.
- Oh Defense's muted branch: from the chosen layer to the final norm with one head's query
  scaled by 1e-5, giving `oh_angle` at the last position.

Both branches see no past keys: they are meant for a prefill that starts from an empty cache.
The muted branch replays the trunk's guards; where SafePTR's window ends after the Oh layer,
it takes the restored (pruned) positions from the unmuted restore branch, as the trunk does.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .families import FamilySpec
from .guard_settings import GuardSettings
from .guarded_attention import GUARDED_ATTENTION, AttentionGuard


def guard_input_names(settings: GuardSettings) -> list[str]:
    """The decoder's extra guard inputs, in graph order."""
    names = []
    if settings.ptr or settings.oh:
        names.append("guard_positions")
    if settings.align:
        names += ["align_gamma", "align_prefix_mask"]
    if settings.ptr:
        names += [
            "ptr_image_mask",
            "ptr_instruction_mask",
            "ptr_k_fraction",
            "ptr_past_pruned_mask",
        ]
    return names


def guard_output_names(settings: GuardSettings) -> list[str]:
    """The decoder's extra guard outputs, in graph order."""
    return (["ptr_pruned_mask"] if settings.ptr else []) + (["oh_angle"] if settings.oh else [])


class _TensorCache:
    """The minimal cache interface the family layers call: concatenate past and new KV."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)

    def update(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values to the layer's past and keep the result."""
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


def cache_keyword(layer: torch.nn.Module) -> str:
    """The decoder layer's KV-cache keyword: `cache` (newer transformers) or `past_key_values`."""
    parameters = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def allowed_keys(
    attention_mask: torch.Tensor, past_len: int, seq_len: int, window: int | None
) -> torch.Tensor:
    """Causal, padding and sliding-window visibility as a boolean [B, 1, Q, K] mask."""
    total = attention_mask.shape[1]
    query_at = torch.arange(seq_len, device=attention_mask.device) + past_len
    key_at = torch.arange(total, device=attention_mask.device)
    visible = key_at[None, :] <= query_at[:, None]
    if window is not None:
        visible = visible & (query_at[:, None] - key_at[None, :] < window)
    return visible[None, None] & attention_mask.bool()[:, None, None, :]


def align_calibrated(prefix_mask: torch.Tensor, past_len: int, seq_len: int) -> torch.Tensor:
    """GuardAlign's target cells [B, 1, Q, K]: queries after the safety prefix, keys inside it."""
    total = prefix_mask.shape[1]
    in_prefix = prefix_mask.bool()
    key_at = torch.arange(total, device=prefix_mask.device)
    prefix_end = torch.where(in_prefix, key_at[None, :], -1).amax(dim=-1)  # [B], -1 if none
    query_at = torch.arange(seq_len, device=prefix_mask.device) + past_len
    after = query_at[None, :] > prefix_end[:, None]  # [B, Q]
    return (after[:, :, None] & in_prefix[:, None, :])[:, None]


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


def deflection_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between vectors in degrees, computed stably for small angles."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    radians = 2.0 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    return radians * (180.0 / math.pi)


class GuardedDecoder(nn.Module):
    """inputs_embeds + attention mask + past KV (+ guard inputs) -> logits + present KV (+ taps)."""

    def __init__(
        self,
        spec: FamilySpec,
        model: nn.Module,
        settings: GuardSettings,
        ptr_reference: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        language_model = spec.resolve(model, spec.language_model)
        language_model.set_attn_implementation(GUARDED_ATTENTION)
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.lm_head = spec.resolve(model, spec.lm_head)
        self.settings = settings
        self.input_guards = guard_input_names(settings)
        text_config = language_model.config
        self.windows = [self._layer_window(text_config, i) for i in range(len(self.layers))]
        if settings.ptr:
            if ptr_reference is None:
                raise ValueError("SafePTR needs its reference vector R")
            self.register_buffer("ptr_reference", ptr_reference.detach().clone())

    @staticmethod
    def _layer_window(config: object, index: int) -> int | None:
        """The sliding window of one layer, or None for full attention."""
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if layer_types is not None:
            return window if layer_types[index] == "sliding_attention" else None
        return window

    def _layer(
        self,
        index: int,
        hidden: torch.Tensor,
        allowed: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: _TensorCache | None,
        guard: AttentionGuard | None,
    ) -> torch.Tensor:
        """Run one family layer with our mask, cache and guard."""
        layer = self.layers[index]
        return layer(
            hidden,
            attention_mask=allowed,
            position_embeddings=rope,
            use_cache=cache is not None,
            attention_guard=guard,
            **{cache_keyword(layer): cache},
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: tuple[torch.Tensor, ...],
        guard_inputs: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor, ...]:
        """One prefill or decode step; returns logits, present KV (k, v per layer), guard taps."""
        s = self.settings
        g = dict(zip(self.input_guards, guard_inputs, strict=True))
        seq_len = inputs_embeds.shape[1]
        past_len = past_key_values[0].shape[2]
        cache = _TensorCache(list(zip(past_key_values[0::2], past_key_values[1::2], strict=True)))
        rope = self.rotary(inputs_embeds, position_ids)
        allowed = {w: allowed_keys(attention_mask, past_len, seq_len, w) for w in set(self.windows)}
        calibrated = (
            align_calibrated(g["align_prefix_mask"], past_len, seq_len) if s.align else None
        )

        # Side branches run over the gathered chunk positions only, without past keys.
        positions = g.get("guard_positions")
        if positions is not None and not torch.compiler.is_exporting() and not positions.numel():
            positions = None  # eager decode: skip the empty branches (the graph always has them)
        if positions is not None:
            key_positions = positions + past_len

            def gather(x: torch.Tensor, dim: int, keys: bool = False) -> torch.Tensor:
                return x.index_select(dim, key_positions if keys else positions)

            branch_rope = (gather(rope[0], 1), gather(rope[1], 1))
            branch_allowed = {w: gather(gather(m, 2), 3, True) for w, m in allowed.items()}
            branch_calibrated = gather(gather(calibrated, 2), 3, True) if s.align else None

        hidden = inputs_embeds
        pruned_chunk = pruned_all = branch_pruned = restore = muted = None
        for i in range(len(self.layers)):
            gamma = g["align_gamma"][i] if s.align else None
            in_window = s.ptr and s.ptr_window[0] <= i < s.ptr_window[1]
            if s.ptr and i == s.ptr_window[0]:
                pruned_chunk = ptr_select(
                    hidden,
                    self.ptr_reference,
                    [g["ptr_image_mask"], g["ptr_instruction_mask"]],
                    attention_mask[:, past_len:],
                    g["ptr_k_fraction"],
                )
                pruned_all = torch.cat([g["ptr_past_pruned_mask"].bool(), pruned_chunk], dim=1)
                if positions is not None:
                    branch_pruned = gather(pruned_all, 1, True)
                    restore = gather(hidden, 1)
            if s.oh and i == s.oh_layer and positions is not None:
                muted = gather(hidden, 1)
            window = self.windows[i]

            trunk_guard = AttentionGuard(gamma, calibrated, pruned_all if in_window else None)
            next_hidden = self._layer(i, hidden, allowed[window], rope, cache, trunk_guard)
            if in_window and restore is not None:
                restore = self._layer(
                    i,
                    restore,
                    branch_allowed[window],
                    branch_rope,
                    None,
                    AttentionGuard(gamma, branch_calibrated),
                )
            if muted is not None:
                muted = self._layer(
                    i,
                    muted,
                    branch_allowed[window],
                    branch_rope,
                    None,
                    AttentionGuard(
                        gamma,
                        branch_calibrated,
                        branch_pruned if in_window else None,
                        s.oh_head if i == s.oh_layer else None,
                    ),
                )
            hidden = next_hidden
            if restore is not None and i == s.ptr_window[1] - 1:
                restored = hidden.index_copy(1, positions, restore)
                hidden = torch.where(pruned_chunk[..., None], restored, hidden)
                if muted is not None:
                    muted = torch.where(branch_pruned[..., None], restore, muted)

        final = self.norm(hidden)
        outputs: list[torch.Tensor] = [self.lm_head(final)]
        for key, value in cache.present:
            outputs += [key, value]
        if s.ptr:
            outputs.append(pruned_all.to(torch.int64))
        if s.oh and muted is None:
            outputs.append(torch.zeros(final.shape[0], dtype=final.dtype))
        elif s.oh:
            # At decode `positions` is empty: both sides fall back to the last row, angle 0.
            fallback = final[:, -1:]
            muted_last = torch.cat([fallback, self.norm(muted)], dim=1)[:, -1]
            normal_last = torch.cat([fallback, gather(final, 1)], dim=1)[:, -1]
            outputs.append(deflection_degrees(normal_last, muted_last))
        return tuple(outputs)
