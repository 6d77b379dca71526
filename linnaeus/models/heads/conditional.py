"""Conditional classifier head: a finer rank's logits conditioned on the coarser rank's prediction.

The coarser rank's logits are turned into a routing distribution ``r`` over its classes (``route``), which
reaches the finer rank in two ways:

- through the parent map, as a prior: every fine class gets ``scale * log r[parent]``, so with ``scale = 1``
  and soft routing the head is a soft version of ``p(child) = p(parent) p(child | parent)``, and with hard
  routing the children of the predicted parent are favoured by ``-scale * log(eps)`` over all others;
- as context: ``r @ E`` (a learned embedding per coarse class, zero at the start) is added to the shared
  feature before the fine rank's linear layer, so the fine classifier can depend on the coarse decision.

The null class (unknown at this rank) has no parent in the tree (any known coarse taxon may have an
unidentified fine rank), so it gets no prior term; it still sees the context.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linnaeus.data.taxonomy import NULL_INDEX
from linnaeus.models.heads.parents import parent_index
from linnaeus.models.layers import init_weights

ROUTINGS = ("soft", "gumbel", "hard")
HARD_EPS = 1e-6  # log(eps) ~ -13.8: the prior of a fine class whose parent was not chosen


def route(
    logits: torch.Tensor, mode: str, temperature: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse logits ``(B, C)`` -> routing ``(probs, log_probs)``, both ``(B, C)`` and float32.

    ``soft``: ``softmax(logits / T)``. ``gumbel``: Gumbel-softmax sample ``softmax((logits + g) / T)`` while
    training, soft at evaluation. ``hard``: the argmax one-hot in the forward pass, the soft distribution's
    gradient in the backward pass (straight-through); log-probabilities are ``0`` / ``log(eps)``.
    """
    if mode not in ROUTINGS:
        raise ValueError(f"model.head_routing must be one of {ROUTINGS}, got {mode!r}")
    logits = logits.float()
    if mode == "gumbel" and training:
        gumbel = -torch.empty_like(logits).exponential_().log()
        log_probs = F.log_softmax((logits + gumbel) / temperature, dim=-1)
        return log_probs.exp(), log_probs
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    probs = log_probs.exp()
    if mode != "hard":
        return probs, log_probs
    one_hot = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    hard_log = torch.log(one_hot.clamp_min(HARD_EPS))
    return one_hot + probs - probs.detach(), hard_log + log_probs - log_probs.detach()


class ConditionalClassifierHead(nn.Module):
    """Logits of one rank from the shared feature and the coarser rank's routed prediction.

    ``parents`` (``(C,)``, index of each class's parent among the ``parent_classes`` coarser classes) is None
    for the coarsest rank, where the head is a plain linear head.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        parents: np.ndarray | None = None,
        parent_classes: int | None = None,
        routing: str = "soft",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"model.head_routing must be one of {ROUTINGS}, got {routing!r}")
        if temperature <= 0:
            raise ValueError(f"model.head_temperature must be > 0, got {temperature}")
        self.routing, self.temperature = routing, float(temperature)
        self.fc = nn.Linear(in_dim, num_classes)
        self.is_root = parents is None
        if not self.is_root:
            self.register_buffer("parents", parent_index(parents, num_classes, parent_classes), False)
            has_prior = torch.ones(num_classes)
            has_prior[NULL_INDEX] = 0.0
            self.register_buffer("has_prior", has_prior, persistent=False)
            self.context = nn.Parameter(torch.zeros(parent_classes, in_dim))
            self.prior_scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self.fc)
        if not self.is_root:
            nn.init.zeros_(self.context)
            nn.init.ones_(self.prior_scale)

    def forward(self, features: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` ``(B, F)``, coarser rank's logits ``(B, P)`` -> this rank's logits ``(B, C)``."""
        if self.is_root:
            return self.fc(features)
        if previous is None:
            raise ValueError("a conditional head below the coarsest rank needs the coarser rank's logits")
        probs, log_probs = route(previous, self.routing, self.temperature, self.training)
        context = (probs @ self.context.float()).to(features.dtype)  # (B, F)
        prior = log_probs[:, self.parents] * self.has_prior  # (B, C)
        return self.fc(features + context) + self.prior_scale * prior
