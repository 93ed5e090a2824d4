"""The detector head: global cosine against the concept bank and OT patch scores (torch).

Given an image embedding, patch embeddings and the concept bank's text embeddings, the
head computes (docs/guards.md, the safety detector):

- global cosine [ours: category embedding = normalised mean of its normalised variants]:
  cos(image, category) per category, and `score_global` = the largest;
- OT patch scores (GuardAlign, parameters [ours]): per category, a Sinkhorn transport
  between the patches (mass: entropy-weighted) and the category's variants (uniform mass)
  with cost 1 - cos; a patch's score is 1 - its transport cost per unit mass, so higher
  means closer to the category, like a cosine (the paper's tau = 0.42 on cost is 0.58
  here); `score_ot` = the largest patch score over patches and categories (an image is
  unsafe if any patch is flagged).

Sinkhorn runs in the log domain for a fixed number of iterations, unrolled when traced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["OTParams", "DetectorHead", "PAD_LOG_MASS"]

PAD_LOG_MASS = -1.0e4  # log-mass of padding variants: finite so fp16 graphs stay NaN-free


@dataclass(frozen=True)
class OTParams:
    """The OT head's [ours] parameters, recorded in the manifest."""

    epsilon: float = 0.1  # Sinkhorn entropic regularisation, cost units
    iterations: int = 50  # Sinkhorn iterations, unrolled in the graph
    entropy_temperature: float = 0.5  # T in patch mass softmax(-entropy / T)
    category_logit_scale: float | None = None  # None: the checkpoint's exp(logit_scale)

    def to_json(self) -> dict:
        """The parameters as plain JSON data, with the cost and score conventions spelled out."""
        return {
            **asdict(self),
            "cost": "1 - cos(patch, variant) on L2-normalised embeddings",
            "patch_mass": "softmax over patches of -entropy(softmax_c(scale * cos(patch, c))) / T",
            "variant_mass": "uniform per category",
            "patch_score": "1 - transport cost per unit patch mass (higher = closer)",
            "image_score": "max over patches and categories",
        }


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last axis."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class DetectorHead(nn.Module):
    """Global cosine and OT patch scores against a fixed bank of text embeddings."""

    def __init__(
        self, variant_embeds: list[torch.Tensor], params: OTParams, logit_scale: float
    ) -> None:
        """Store the bank: one [N_c, D] tensor of text-variant embeddings per category."""
        super().__init__()
        count = max(v.shape[0] for v in variant_embeds)
        dim = variant_embeds[0].shape[1]
        padded = torch.zeros(len(variant_embeds), count, dim)
        log_mass = torch.full((len(variant_embeds), count), PAD_LOG_MASS)
        for index, variants in enumerate(variant_embeds):
            n = variants.shape[0]
            padded[index, :n] = _normalise(variants.float())
            log_mass[index, :n] = -torch.log(torch.tensor(float(n)))
        self.register_buffer("variants", padded)  # [C, N, D], zero rows are padding
        self.register_buffer("variant_log_mass", log_mass)  # [C, N]
        self.register_buffer("categories", _normalise(padded.sum(1)))  # [C, D]
        self.params = params
        self.scale = float(
            params.category_logit_scale if params.category_logit_scale else logit_scale
        )

    def patch_log_mass(self, patches: torch.Tensor) -> torch.Tensor:
        """Log of the entropy-weighted patch mass [B, P] (confident patches count more)."""
        probs = torch.softmax(self.scale * patches @ self.categories.T, dim=-1)  # [B, P, C]
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return torch.log_softmax(-entropy / self.params.entropy_temperature, dim=-1)

    def ot_scores(self, patches: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
        """Per-patch, per-category OT scores [B, P, C] (1 - transport cost per unit mass)."""
        cos = torch.einsum("bpd,cnd->bcpn", patches, self.variants)  # [B, C, P, N]
        cost = 1.0 - cos
        log_k = -cost / self.params.epsilon
        log_a = log_a[:, None, :, None]  # [B, 1, P, 1]
        log_b = self.variant_log_mass[None, :, None, :]  # [1, C, 1, N]
        log_v = torch.zeros_like(log_b)
        for _ in range(self.params.iterations):
            log_u = log_a - torch.logsumexp(log_k + log_v, dim=3, keepdim=True)
            log_v = log_b - torch.logsumexp(log_k + log_u, dim=2, keepdim=True)
        # Row of the plan for patch p, normalised by its own mass: u_p cancels.
        row = torch.softmax(log_k + log_v, dim=3)
        patch_cost = (row * cost).sum(3)  # [B, C, P]
        return (1.0 - patch_cost).transpose(1, 2)

    def forward(
        self, image_embeds: torch.Tensor, patch_embeds: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Compute every score from raw image [B, D] and patch [B, P, D] embeddings."""
        image = _normalise(image_embeds)
        patches = _normalise(patch_embeds)
        global_cosine = image @ self.categories.T  # [B, C]
        log_a = self.patch_log_mass(patches)
        patch_scores = self.ot_scores(patches, log_a)
        return {
            "det_global_cosine": global_cosine,
            "det_patch_ot_scores": patch_scores,
            "det_patch_mass": log_a.exp(),
            "det_score_global": global_cosine.amax(dim=1),
            "det_score_ot": patch_scores.amax(dim=(1, 2)),
        }
