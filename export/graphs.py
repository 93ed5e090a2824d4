"""The three graphs of a bundle: their torch modules, IO specs and tracing inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmguard.guards import (
    BATCH,
    GUARD_POSITIONS,
    PAST,
    SEQUENCE,
    TOTAL,
    GuardSettings,
    TensorSpec,
    decoder_guard_inputs,
    decoder_guard_outputs,
)

from .families import FamilySpec
from .guards.decoder import GuardedDecoder

# Tracing sizes: all different and above 1, so torch.export keeps every axis symbolic.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST, TRACE_POSITIONS, TRACE_IMAGES = 2, 7, 3, 5, 2


@dataclass
class GraphPlan:
    """A module to export with its IO specs and the example inputs to trace it with."""

    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example: list[torch.Tensor]


class VisionEncoder(nn.Module):
    """The family's vision inputs -> image_features (projected to the language model's width)."""

    def __init__(self, spec: FamilySpec, model: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.model = model

    def flat_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The family's vision forward."""
        return self.spec.vision_features(self.model, *inputs)


class EmbedTokens(nn.Module):
    """input_ids -> inputs_embeds."""

    def __init__(self, spec: FamilySpec, model: nn.Module) -> None:
        super().__init__()
        self.embed = spec.resolve(model, spec.embed_tokens)

    def flat_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Look the tokens up."""
        return self.embed(input_ids)


class FlatDecoder(nn.Module):
    """The guarded decoder with the flat positional signature the exporter names."""

    def __init__(self, decoder: GuardedDecoder, num_layers: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.num_kv = 2 * num_layers

    def flat_forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split the flat inputs into embeds, mask, positions, past KV and guard inputs."""
        embeds, mask, positions = tensors[:3]
        past = tensors[3 : 3 + self.num_kv]
        guards = tensors[3 + self.num_kv :]
        return self.decoder(embeds, mask, positions, past, guards)


def vision_plan(spec: FamilySpec, model: nn.Module) -> GraphPlan:
    """Plan the vision encoder graph."""
    hidden = model.config.text_config.hidden_size
    tokens = spec.num_image_tokens(model.config)
    return GraphPlan(
        VisionEncoder(spec, model),
        spec.vision_inputs(model.config),
        [TensorSpec("image_features", ("num_images", tokens, hidden), "float32")],
        spec.vision_example(model.config, TRACE_IMAGES),
    )


def embed_plan(spec: FamilySpec, model: nn.Module) -> GraphPlan:
    """Plan the token embedding graph."""
    hidden = model.config.text_config.hidden_size
    return GraphPlan(
        EmbedTokens(spec, model),
        [TensorSpec("input_ids", (BATCH, SEQUENCE), "int64")],
        [TensorSpec("inputs_embeds", (BATCH, SEQUENCE, hidden), "float32")],
        [torch.randint(0, 10, (TRACE_BATCH, TRACE_SEQ))],
    )


def kv_shape(text_config: object) -> tuple[int, int]:
    """(KV heads, head dim) of a language model config."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return text_config.num_key_value_heads, head_dim


def decoder_io(text_config: object, settings: GuardSettings) -> tuple[list, list]:
    """Input and output specs of the guarded decoder."""
    layers, hidden = text_config.num_hidden_layers, text_config.hidden_size
    kv_heads, head_dim = kv_shape(text_config)
    b, s, p, t = BATCH, SEQUENCE, PAST, TOTAL
    inputs = [
        TensorSpec("inputs_embeds", (b, s, hidden), "float32"),
        TensorSpec("attention_mask", (b, t), "int64"),
        TensorSpec("position_ids", (b, s), "int64"),
    ]
    outputs = [TensorSpec("logits", (b, s, text_config.vocab_size), "float32")]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(
                TensorSpec(f"past_key_values.{i}.{kind}", (b, kv_heads, p, head_dim), "float32")
            )
            outputs.append(TensorSpec(f"present.{i}.{kind}", (b, kv_heads, t, head_dim), "float32"))
    inputs += decoder_guard_inputs(settings, layers)
    outputs += decoder_guard_outputs(settings)
    return inputs, outputs


def decoder_example(inputs: list[TensorSpec]) -> list[torch.Tensor]:
    """Tracing inputs: a left-padded batch with a past, so no axis or mask is specialised away."""
    sizes = {
        BATCH: TRACE_BATCH,
        SEQUENCE: TRACE_SEQ,
        PAST: TRACE_PAST,
        TOTAL: TRACE_PAST + TRACE_SEQ,
        GUARD_POSITIONS.dims[0]: TRACE_POSITIONS,
    }
    example = []
    for spec in inputs:
        shape = [sizes.get(d, d) if isinstance(d, str) else d for d in spec.dims]
        if spec.name == "attention_mask":
            tensor = torch.ones(shape, dtype=torch.int64)
            tensor[0, : TRACE_PAST + 2] = 0  # left padding in the first row
        elif spec.name == "position_ids":
            tensor = torch.arange(TRACE_SEQ).expand(TRACE_BATCH, -1) + TRACE_PAST
        elif spec.name == GUARD_POSITIONS.name:
            tensor = torch.arange(TRACE_POSITIONS)
        elif spec.dtype == "int64":
            tensor = torch.randint(0, 2, shape)
        else:
            tensor = torch.rand(shape)
        example.append(tensor.contiguous())
    return example


def decoder_plan(
    spec: FamilySpec, model: nn.Module, settings: GuardSettings, ptr_reference: torch.Tensor | None
) -> GraphPlan:
    """Plan the guarded decoder graph."""
    text_config = model.config.text_config
    decoder = GuardedDecoder(spec, model, settings, ptr_reference)
    inputs, outputs = decoder_io(text_config, settings)
    example = decoder_example(inputs)
    decoder.check_guards_reach_attention(example)  # never export a silently unguarded graph
    return GraphPlan(FlatDecoder(decoder, text_config.num_hidden_layers), inputs, outputs, example)
