"""The exported decoder against transformers on the same inputs: prefill and decode with KV."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import COMBO_IDS, COMBOS, base_feeds, make_prompt, neutral_guards
from transformers import DynamicCache

from vlmguard.export.guards.decoder import cache_keyword

TOL = 1e-4
DECODE_STEPS = 3


def _assert_kv_close(ours: np.ndarray, theirs: torch.Tensor, valid: np.ndarray) -> None:
    """Compare KV at key positions a real query can see (HF may keep only a sliding tail)."""
    theirs = theirs.numpy()
    length = theirs.shape[2]
    ours, valid = ours[:, :, -length:], valid[:, -length:]
    diff = np.abs(ours - theirs).max(axis=(1, 3))  # [batch, keys]
    assert diff[valid.astype(bool)].max() < TOL


@pytest.mark.parametrize("kind", ["plain", "guarded"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_prefill_and_decode_match_transformers(tiny_setup, vision, text, batch, kind):
    setup = tiny_setup(vision, text)
    decoder = setup.decoder(kind)
    prompt = make_prompt(setup, batch)
    if batch == 2:
        assert (prompt.attention_mask == 0).any(), "the batch must be left-padded"
    embeds, mask, positions = prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids
    cache = DynamicCache(config=setup.model.config.text_config)
    past = decoder.empty_past(batch)
    for step in range(DECODE_STEPS + 1):
        seq, total = embeds.shape[1], mask.shape[1]
        feeds = {**base_feeds(embeds, mask, positions), **past}
        feeds |= neutral_guards(decoder, batch, seq, total, prefill=step == 0)
        ours = decoder.run(feeds)
        with torch.no_grad():
            theirs = setup.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_keyword(setup.model): cache},
            )
        valid_rows = mask[:, -seq:].numpy().astype(bool)
        logit_diff = np.abs(ours["logits"] - theirs.logits.numpy()).max(-1)
        assert logit_diff[valid_rows].max() < TOL, f"logits differ at step {step}"
        for i, layer in enumerate(cache.layers):
            _assert_kv_close(ours[f"present.{i}.key"], layer.keys, mask.numpy())
            _assert_kv_close(ours[f"present.{i}.value"], layer.values, mask.numpy())
        past = decoder.next_past(ours)
        token = theirs.logits[:, -1].argmax(-1, keepdim=True)
        embeds = setup.model.get_input_embeddings()(token).detach()
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1


@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=COMBO_IDS)
def test_neutral_guards_give_exactly_the_unguarded_logits(tiny_setup, vision, text):
    setup = tiny_setup(vision, text)
    plain, guarded = setup.decoder("plain"), setup.decoder("guarded")
    prompt = make_prompt(setup, 2)
    embeds, mask, positions = prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids
    past_plain, past_guarded = plain.empty_past(2), guarded.empty_past(2)
    for step in range(DECODE_STEPS + 1):
        seq, total = embeds.shape[1], mask.shape[1]
        feeds = base_feeds(embeds, mask, positions)
        out_plain = plain.run({**feeds, **past_plain})
        guards = neutral_guards(guarded, 2, seq, total, prefill=step == 0)
        out_guarded = guarded.run({**feeds, **past_guarded, **guards})
        np.testing.assert_array_equal(out_guarded["logits"], out_plain["logits"])
        past_plain, past_guarded = plain.next_past(out_plain), guarded.next_past(out_guarded)
        token = torch.from_numpy(out_plain["logits"][:, -1].argmax(-1))[:, None]
        embeds = setup.model.get_input_embeddings()(token).detach()
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
