"""What each in-model guard computes, against references written independently here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from support import (
    COMBO_IDS,
    COMBOS,
    OH_HEAD,
    OH_LAYER,
    PTR_WINDOW,
    base_feeds,
    make_prompt,
    neutral_guards,
)
from transformers import AttentionInterface

from vlmguard.export.families import LLAVA
from vlmguard.export.guards.decoder import GuardedDecoder
from vlmguard.export.guards.ptr import ptr_reference
from vlmguard.guards import PTR_REFERENCE_TEXT, GuardSettings

TOL = 1e-4
ALIGN_LAYER, ALIGN_GAMMA = 1, 0.8
K_FRACTION = 0.25


def _guard_masks(prompt, image_token_id: int) -> dict[str, torch.Tensor]:
    """Image rows, instruction rows (user text after the image) and a safety-prefix mask."""
    ids, mask = prompt.input_ids, prompt.attention_mask.bool()
    image = ids == image_token_id
    index = torch.arange(ids.shape[1])
    last_image = torch.where(image, index, -1).amax(-1, keepdim=True)
    instruction = mask & (index > last_image) & (index < ids.shape[1] - 2)
    first_valid = (~mask).sum(-1, keepdim=True)
    prefix = (index >= first_valid + 1) & (index < first_valid + 4)  # three tokens after BOS
    return {"image": image, "instruction": instruction, "prefix": prefix}


def _capture_attention(module: torch.nn.Module) -> tuple[dict[int, list], list]:
    """Record every self-attention call's probabilities, per layer, in call order."""
    calls: dict[int, list] = {}
    handles = []
    for i, layer in enumerate(module.layers):

        def hook(mod, args, output, i=i):
            calls.setdefault(i, []).append(output[1].detach())

        handles.append(layer.self_attn.register_forward_hook(hook))
    return calls, handles


def _torch_decoder(setup, settings: GuardSettings) -> GuardedDecoder:
    """The guarded decoder in PyTorch, on a copy of the model (it takes over attention)."""
    model = copy.deepcopy(setup.model)
    reference = None
    if settings.ptr:
        reference = ptr_reference(LLAVA, model, setup.processor.tokenizer, settings.ptr_window[0])
    return GuardedDecoder(LLAVA, model, settings, reference).eval()


def _reference_attention_factory(state: dict):
    """An independent eager attention with GuardAlign's boost at one layer, recording probs."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        logits = query @ key.transpose(2, 3) * scaling
        mask = state["mask"]
        q_len, k_len = logits.shape[-2:]
        q_at = torch.arange(q_len) + (k_len - q_len)
        k_at = torch.arange(k_len)
        allowed = (k_at[None, :] <= q_at[:, None])[None, None] & mask[:, None, None, :].bool()
        window = getattr(module.config, "sliding_window", None)
        if window is not None:
            allowed = allowed & (q_at[:, None] - k_at[None, :] < window)[None, None]
        if module.layer_idx == state["layer"]:
            prefix = state["prefix"]
            end = torch.where(prefix, k_at, -1).amax(-1)
            cells = (q_at[None, :, None] > end[:, None, None]) & prefix[:, None, :]
            logits = torch.where(
                cells[:, None], logits + state["gamma"] * logits.clamp_min(0), logits
            )
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        probs = logits.softmax(-1)
        state["probs"][module.layer_idx] = probs.detach()
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attention


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_align_boosts_prefix_keys_at_the_calibrated_layer_only(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    prompt = make_prompt(setup, 2)
    masks = _guard_masks(prompt, setup.model.config.image_token_id)
    layers = setup.model.config.text_config.num_hidden_layers
    gamma = torch.zeros(layers)
    gamma[ALIGN_LAYER] = ALIGN_GAMMA

    decoder = _torch_decoder(setup, GuardSettings(align=True))
    calls, handles = _capture_attention(decoder)
    past = tuple(torch.zeros(2, *kv.shape[1:2], 0, kv.shape[3]) for kv in _kv_templates(setup))
    with torch.no_grad():
        decoder(
            prompt.inputs_embeds,
            prompt.attention_mask,
            prompt.position_ids,
            past,
            (gamma, masks["prefix"].long()),
        )
    for handle in handles:
        handle.remove()

    state = {
        "mask": prompt.attention_mask,
        "prefix": masks["prefix"],
        "gamma": ALIGN_GAMMA,
        "layer": ALIGN_LAYER,
        "probs": {},
    }
    AttentionInterface.register("vlmguard_test_reference", _reference_attention_factory(state))
    reference = copy.deepcopy(setup.model)
    reference.set_attn_implementation("vlmguard_test_reference")
    with torch.no_grad():
        reference(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
        )
        state["layer"] = -1  # and once more without the boost anywhere
        boosted = dict(state["probs"])
        reference(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
        )
    rows = prompt.attention_mask.bool()
    for layer in range(layers):
        ours = calls[layer][0].permute(0, 2, 1, 3)[rows]  # [valid rows, heads, keys]
        want = boosted[layer].permute(0, 2, 1, 3)[rows]
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    plain = state["probs"][ALIGN_LAYER].permute(0, 2, 1, 3)[rows]
    assert (boosted[ALIGN_LAYER].permute(0, 2, 1, 3)[rows] - plain).abs().max() > 1e-3


def _kv_templates(setup) -> list[torch.Tensor]:
    """One zero KV tensor per layer input, for building an empty past."""
    text = setup.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return [torch.zeros(1, text.num_key_value_heads, 0, head_dim)] * (2 * text.num_hidden_layers)


def _ptr_feeds(decoder, prompt, masks, k_fraction: float) -> dict[str, np.ndarray]:
    """Prefill feeds for the ONNX guarded decoder with SafePTR switched on."""
    batch, seq = prompt.input_ids.shape
    feeds = {**base_feeds(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)}
    feeds |= decoder.empty_past(batch) | neutral_guards(decoder, batch, seq, seq, prefill=True)
    feeds["ptr_image_mask"] = masks["image"].long().numpy()
    feeds["ptr_instruction_mask"] = masks["instruction"].long().numpy()
    feeds["ptr_k_fraction"] = np.array(k_fraction, np.float32)
    return feeds


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_ptr_prunes_the_top_k_deviating_tokens_per_group(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    decoder = setup.decoder("guarded")
    prompt = make_prompt(setup, 2)
    masks = _guard_masks(prompt, setup.model.config.image_token_id)
    pruned = decoder.run(_ptr_feeds(decoder, prompt, masks, K_FRACTION))["ptr_pruned_mask"]

    start = PTR_WINDOW[0]
    tokenizer = setup.processor.tokenizer
    with torch.no_grad():
        states = (
            setup.model(
                inputs_embeds=prompt.inputs_embeds,
                attention_mask=prompt.attention_mask,
                position_ids=prompt.position_ids,
                output_hidden_states=True,
            )
            .hidden_states[start]
            .double()
        )
        ref_ids = torch.tensor([tokenizer(PTR_REFERENCE_TEXT)["input_ids"]])
        r = setup.model(input_ids=ref_ids, output_hidden_states=True).hidden_states[start][0, -1]
    deviation = 1 - torch.nn.functional.cosine_similarity(states, r.double()[None, None], dim=-1)
    for row in range(2):
        want = set()
        for group in ("image", "instruction"):
            members = torch.nonzero(masks[group][row]).flatten().tolist()
            k = int(np.floor(K_FRACTION * len(members) + 0.5))
            assert k >= 1
            ranked = sorted(members, key=lambda j: -deviation[row, j].item())
            want |= set(ranked[:k])
        assert set(np.nonzero(pruned[row])[0].tolist()) == want


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_ptr_window_masks_pruned_keys_then_restores_them(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    prompt = make_prompt(setup, 2)
    masks = _guard_masks(prompt, setup.model.config.image_token_id)
    decoder = _torch_decoder(setup, GuardSettings(ptr_window=PTR_WINDOW))
    calls, handles = _capture_attention(decoder)
    entering: list[torch.Tensor] = []
    after = decoder.layers[PTR_WINDOW[1]].register_forward_pre_hook(
        lambda mod, args: entering.append(args[0].detach())
    )
    seq = prompt.input_ids.shape[1]
    past = tuple(torch.zeros(2, *kv.shape[1:2], 0, kv.shape[3]) for kv in _kv_templates(setup))
    guards = (
        torch.arange(seq),
        masks["image"].long(),
        masks["instruction"].long(),
        torch.tensor(K_FRACTION),
        torch.zeros(2, 0, dtype=torch.long),
    )
    with torch.no_grad():
        outputs = decoder(
            prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids, past, guards
        )
        plain = setup.model(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
            output_hidden_states=True,
        ).hidden_states[PTR_WINDOW[1]]
    for handle in [*handles, after]:
        handle.remove()
    pruned = outputs[-1].bool()
    rows = prompt.attention_mask.bool()
    assert pruned.any()
    for layer, layer_calls in calls.items():
        trunk = layer_calls[0]  # the trunk runs before the side branch in every layer
        to_pruned = trunk.permute(0, 2, 1, 3)[rows].sum(1)  # [valid rows, keys]
        batch_of_row = torch.nonzero(rows)[:, 0]
        weight = (to_pruned * pruned[batch_of_row]).sum()
        if PTR_WINDOW[0] <= layer < PTR_WINDOW[1]:
            assert weight == 0, f"layer {layer} attends to a pruned key"
        else:
            assert weight > 0
    merged = entering[0]
    torch.testing.assert_close(merged[pruned], plain[pruned], atol=1e-5, rtol=0)
    kept = rows & ~pruned
    assert (merged[kept] - plain[kept]).abs().max() > 1e-4, "pruning changed nothing"


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_oh_angle_matches_two_full_passes_with_the_head_muted(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    decoder = setup.decoder("guarded")
    prompt = make_prompt(setup, 2)
    batch, seq = prompt.input_ids.shape
    feeds = base_feeds(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)
    feeds |= decoder.empty_past(batch) | neutral_guards(decoder, batch, seq, seq, prefill=True)
    angle = decoder.run(feeds)["oh_angle"]

    muted = copy.deepcopy(setup.model)
    attention = muted.model.language_model.layers[OH_LAYER].self_attn
    head_dim = attention.head_dim
    rows = slice(OH_HEAD * head_dim, (OH_HEAD + 1) * head_dim)
    with torch.no_grad():
        attention.q_proj.weight[rows] *= 1e-5
        if attention.q_proj.bias is not None:
            attention.q_proj.bias[rows] *= 1e-5
        finals = []
        for model in (setup.model, muted):
            out = model.model(
                inputs_embeds=prompt.inputs_embeds,
                attention_mask=prompt.attention_mask,
                position_ids=prompt.position_ids,
            )
            finals.append(out.last_hidden_state[:, -1].double())
    cos = torch.nn.functional.cosine_similarity(finals[0], finals[1], dim=-1).clamp(-1, 1)
    want = torch.rad2deg(torch.arccos(cos)).numpy()
    assert (want > 1e-2).all(), "muting the head should deflect the state"
    np.testing.assert_allclose(angle, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_guarded_graph_matches_pytorch_with_every_guard_on(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    onnx_decoder = setup.decoder("guarded")
    settings = GuardSettings(align=True, ptr_window=PTR_WINDOW, oh_layer=OH_LAYER, oh_head=OH_HEAD)
    torch_decoder = _torch_decoder(setup, settings)
    prompt = make_prompt(setup, 2)
    masks = _guard_masks(prompt, setup.model.config.image_token_id)
    layers = setup.model.config.text_config.num_hidden_layers
    gamma = torch.linspace(0.2, 0.9, layers)
    embeds, mask, positions = prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids
    prefix = masks["prefix"].long()
    feeds = _ptr_feeds(onnx_decoder, prompt, masks, K_FRACTION)
    torch_past = tuple(
        torch.zeros(2, *kv.shape[1:2], 0, kv.shape[3]) for kv in _kv_templates(setup)
    )
    pruned = torch.zeros(2, 0, dtype=torch.long)
    image, instruction = masks["image"].long(), masks["instruction"].long()
    for step in range(4):
        seq = embeds.shape[1]
        positions_in = torch.arange(seq if step == 0 else 0)
        feeds |= base_feeds(embeds, mask, positions)
        feeds |= {
            "align_gamma": gamma.numpy(),
            "align_prefix_mask": prefix.numpy(),
            "guard_positions": positions_in.numpy(),
            "ptr_image_mask": image.numpy(),
            "ptr_instruction_mask": instruction.numpy(),
        }
        ours = onnx_decoder.run(feeds)
        with torch.no_grad():
            theirs = torch_decoder(
                embeds,
                mask,
                positions,
                torch_past,
                (positions_in, gamma, prefix, image, instruction, torch.tensor(K_FRACTION), pruned),
            )
        valid = mask[:, -seq:].bool().numpy()
        diff = np.abs(ours["logits"] - theirs[0].numpy()).max(-1)
        assert diff[valid].max() < TOL
        np.testing.assert_array_equal(ours["ptr_pruned_mask"], theirs[-2].numpy())
        np.testing.assert_allclose(ours["oh_angle"], theirs[-1].numpy(), atol=1e-3)
        if step == 0:
            assert ours["ptr_pruned_mask"].any() and (ours["oh_angle"] > 0).all()
        else:
            assert (ours["oh_angle"] == 0).all(), "decode steps must not run the muted branch"
        feeds |= onnx_decoder.next_past(ours)
        torch_past, pruned = theirs[1:-2], theirs[-2]
        token = theirs[0][:, -1].argmax(-1, keepdim=True)
        embeds = setup.model.get_input_embeddings()(token).detach()
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        prefix = torch.cat([prefix, torch.zeros(2, 1, dtype=prefix.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        image = instruction = torch.zeros(2, 1, dtype=torch.long)


def test_a_family_whose_layers_drop_the_guards_fails_the_export(tiny_setup, tmp_path):
    """A layer that does not pass `attention_guard` on must fail the export, not go unguarded."""
    import transformers

    from vlmguard.errors import UnsupportedModelError
    from vlmguard.export.graphs import decoder_plan

    setup = tiny_setup("clip", "llama")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(setup.source).eval()
    settings = GuardSettings(align=True, ptr_window=PTR_WINDOW, oh_layer=OH_LAYER, oh_head=OH_HEAD)
    reference = ptr_reference(LLAVA, model, setup.processor.tokenizer, PTR_WINDOW[0])
    decoder_plan(LLAVA, model, settings, reference)  # the real layers pass the guards on
    attention = model.model.language_model.layers[1].self_attn
    forward = attention.forward

    def dropping(*args, attention_guard=None, **kwargs):
        return forward(*args, **kwargs)  # the guard never reaches the attention function

    attention.forward = dropping
    with pytest.raises(UnsupportedModelError, match="did not receive the guards"):
        decoder_plan(LLAVA, model, settings, reference)
