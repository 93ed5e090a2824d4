"""The guarded decoder: a language model's layers with the in-model guards, ready to trace.

One module serves every family: it drives the family's own decoder layers with the guarded
attention function, a KV cache given as plain tensors, the family's per-layer mask rules, and
the guards' hooks (`align.py`, `ptr.py`, `oh.py`). Hooks may open side branches (SafePTR's
restore, Oh Defense's muted head) that run only over `guard_positions`: the whole chunk at
prefill, nothing at decode, so decode never pays for them. Side branches see no past keys:
they are meant for a prefill that starts from an empty cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vlmguard.errors import UnsupportedModelError
from vlmguard.guards import GuardSettings, decoder_guard_inputs

from ..families.base import FamilySpec, causal_mask
from .align import AlignHook
from .attention import GUARDED_ATTENTION, AttentionGuard, recording
from .base import TRUNK, DecoderHook, DecoderStep
from .oh import OhHook
from .ptr import PtrHook


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
    attention_mask: torch.Tensor,
    past_len: int,
    seq_len: int,
    window: int | None,
    spec: FamilySpec | None = None,
) -> torch.Tensor:
    """A layer's key visibility (its family's mask rule and the padding) as bool [B, 1, Q, K]."""
    rule = spec.mask_function(window) if spec is not None else causal_mask(window)
    device = attention_mask.device
    batch = torch.arange(attention_mask.shape[0], device=device)[:, None, None, None]
    query = (torch.arange(seq_len, device=device) + past_len)[None, None, :, None]
    key = torch.arange(attention_mask.shape[1], device=device)[None, None, None, :]
    padding = attention_mask.bool()[batch, key]
    return rule(batch, torch.zeros_like(batch), query, key) & padding


def guard_hooks(settings: GuardSettings, ptr_reference: torch.Tensor | None) -> list[DecoderHook]:
    """The torch hooks of the carried guards, in the order they act at each layer."""
    hooks: list[DecoderHook] = []
    if settings.align:
        hooks.append(AlignHook())
    if settings.ptr:
        if ptr_reference is None:
            raise ValueError("SafePTR needs its reference vector R")
        hooks.append(PtrHook(settings.ptr_window, ptr_reference))
    if settings.oh:
        hooks.append(OhHook(settings.oh_layer, settings.oh_head))
    return hooks


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
        self.spec = spec
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.lm_head = spec.resolve(model, spec.lm_head)
        self.settings = settings
        self.input_guards = [t.name for t in decoder_guard_inputs(settings, len(self.layers))]
        self.windows = spec.layer_windows(language_model.config)
        self.hooks = nn.ModuleList(guard_hooks(settings, ptr_reference))
        self._issued: list[AttentionGuard] | None = None  # set while checking the guards

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

    def _guard(self, index: int, branch: str, step: DecoderStep) -> AttentionGuard:
        """What every hook adds to one branch's attention at one layer."""
        fields: dict[str, object] = {}
        for hook in self.hooks:
            fields |= hook.attention(index, branch, step)
        guard = AttentionGuard(**fields)
        if self._issued is not None:
            self._issued.append(guard)
        return guard

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: tuple[torch.Tensor, ...],
        guard_inputs: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor, ...]:
        """One prefill or decode step; returns logits, present KV (k, v per layer), guard taps."""
        g = dict(zip(self.input_guards, guard_inputs, strict=True))
        seq_len = inputs_embeds.shape[1]
        past_len = past_key_values[0].shape[2]
        cache = _TensorCache(list(zip(past_key_values[0::2], past_key_values[1::2], strict=True)))
        rope = self.spec.position_embeddings(self.rotary, inputs_embeds, position_ids)
        allowed = {
            w: allowed_keys(attention_mask, past_len, seq_len, w, self.spec)
            for w in set(self.windows)
        }

        # Side branches run over the gathered chunk positions only, without past keys.
        positions = g.get("guard_positions")
        if positions is not None and not torch.compiler.is_exporting() and not positions.numel():
            positions = None  # eager decode: skip the empty branches (the graph always has them)
        step = DecoderStep(g, attention_mask, past_len, seq_len, positions, inputs_embeds)
        if positions is not None:
            key_positions = positions + past_len

            def gather(x: torch.Tensor, dim: int, keys: bool = False) -> torch.Tensor:
                return x.index_select(dim, key_positions if keys else positions)

            step.gather = gather
            axis = self.spec.rope_sequence_axis
            branch_rope = (gather(rope[0], axis), gather(rope[1], axis))
            branch_allowed = {w: gather(gather(m, 2), 3, True) for w, m in allowed.items()}

        for hook in self.hooks:
            hook.begin(step)
        for i in range(len(self.layers)):
            for hook in self.hooks:
                hook.before_layer(i, step)
            window = self.windows[i]
            trunk_guard = self._guard(i, TRUNK, step)
            trunk = self._layer(i, step.hidden, allowed[window], rope, cache, trunk_guard)
            for name, states in step.branches.items():  # each branch after the trunk
                guard = self._guard(i, name, step)
                step.branches[name] = self._layer(
                    i, states, branch_allowed[window], branch_rope, None, guard
                )
            step.hidden = trunk
            for hook in self.hooks:
                hook.after_layer(i, step)

        final = self.norm(step.hidden)
        outputs: list[torch.Tensor] = [self.lm_head(final)]
        for key, value in cache.present:
            outputs += [key, value]
        for hook in self.hooks:  # in graph order (vlmguard/guards.py)
            outputs += hook.outputs(step, final, self.norm)
        return tuple(outputs)

    def check_guards_reach_attention(self, example: list[torch.Tensor]) -> None:
        """Run once eagerly and refuse a family whose layers drop the guards on the way."""
        kv = 3 + 2 * len(self.layers)
        self._issued = []
        try:
            with torch.no_grad(), recording() as reached:
                self(*example[:3], tuple(example[3:kv]), tuple(example[kv:]))
            arrived = {id(guard) for guard in reached}
            lost = sum(id(guard) not in arrived for guard in self._issued)
        finally:
            self._issued = None
        if lost:
            raise UnsupportedModelError(
                f"{self.spec.name}: {lost} attention call(s) did not receive the guards (the "
                "family's layers drop the `attention_guard` keyword or bypass the registered "
                "attention function); exporting would leave the model unguarded"
            )
