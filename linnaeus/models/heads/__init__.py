"""Classification heads, one per task (taxonomic rank), built together as one ``TaskHeads`` module.

``model.head`` names the head of every task; ``model.head_per_task`` overrides it for some tasks, either
as a mapping ``{task: name}`` (task = task key such as ``taxa_L10``, resolved by ``build_model`` from the
taxonomy, or an index: ``0`` coarsest, ``-1`` finest) or as a list with one name per task, coarse to fine.

Heads run coarse to fine; each receives the shared feature ``(B, F)`` and the previous (coarser) task's
output, so hierarchical heads can condition on it. Every head returns logits ``(B, C_t)``; the
hierarchical softmax returns log-probabilities, which are logits of the same distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from linnaeus.models.heads.conditional import ROUTINGS, ConditionalClassifierHead, route
from linnaeus.models.heads.hsoftmax import HierarchicalSoftmaxHead, grouped_log_softmax
from linnaeus.models.heads.linear import LinearHead

HEADS = {"linear": LinearHead, "conditional": ConditionalClassifierHead, "hsoftmax": HierarchicalSoftmaxHead}

HeadPerTask = Mapping[int | str, str] | Sequence[str] | None


def build_head(
    kind: str,
    in_dim: int,
    num_classes: int,
    *,
    parents: np.ndarray | None = None,
    parent_classes: int | None = None,
    routing: str = "soft",
    temperature: float = 1.0,
) -> nn.Module:
    """The head registered under ``kind`` for one task; ``parents`` is None for the coarsest task."""
    if kind == "linear":
        return LinearHead(in_dim, num_classes)
    if kind == "conditional":
        return ConditionalClassifierHead(
            in_dim,
            num_classes,
            parents=parents,
            parent_classes=parent_classes,
            routing=routing,
            temperature=temperature,
        )
    if kind == "hsoftmax":
        return HierarchicalSoftmaxHead(in_dim, num_classes, parents=parents, parent_classes=parent_classes)
    raise ValueError(f"unknown head {kind!r}; supported heads: {sorted(HEADS)}")


def head_kinds(head: str, head_per_task: HeadPerTask, num_tasks: int) -> list[str]:
    """One head name per task, coarse to fine: ``head`` everywhere, overridden by ``head_per_task``."""
    if head_per_task is None or len(head_per_task) == 0:
        return [head] * num_tasks
    if not isinstance(head_per_task, Mapping):
        if isinstance(head_per_task, str) or len(head_per_task) != num_tasks:
            raise ValueError(
                f"model.head_per_task as a list needs one head name per task ({num_tasks}), got {head_per_task!r}"
            )
        return list(head_per_task)
    kinds = [head] * num_tasks
    for key, kind in head_per_task.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"model.head_per_task.{key}: task keys are resolved from the taxonomy by build_model(..., "
                "taxonomy=...); without it use task indices (0 = coarsest, -1 = finest)"
            ) from None
        if not -num_tasks <= index < num_tasks:
            raise ValueError(f"model.head_per_task.{key}: there are {num_tasks} tasks")
        kinds[index] = kind
    return kinds


class TaskHeads(nn.ModuleList):
    """The heads of all tasks: shared feature ``(B, F)`` -> one logits tensor ``(B, C_t)`` per task.

    A ``ModuleList``, so parameters are named ``heads.<task>.<...>`` as with independent heads.
    """

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        previous = None
        for head in self:
            previous = head(features, previous)
            outputs.append(previous)
        return outputs

    def reset_parameters(self) -> None:
        for head in self:
            head.reset_parameters()


def build_heads(
    in_dim: int,
    num_classes: Sequence[int],
    *,
    parents: Sequence[np.ndarray | None] | None = None,
    head: str = "linear",
    head_per_task: HeadPerTask = None,
    routing: str = "soft",
    temperature: float = 1.0,
) -> TaskHeads:
    """Heads for every task; hierarchical heads below the coarsest task need ``parents`` (the taxonomy's)."""
    num_classes = list(num_classes)
    kinds = head_kinds(head, head_per_task, len(num_classes))
    if parents is not None and len(parents) != len(num_classes):
        raise ValueError(f"{len(parents)} parent maps for {len(num_classes)} tasks")
    heads = []
    for t, (kind, n) in enumerate(zip(kinds, num_classes)):
        task_parents = None if t == 0 or parents is None else parents[t]
        if t > 0 and kind != "linear" and task_parents is None:
            raise ValueError(
                f"head {kind!r} at task {t} needs the taxonomy's parent maps: build the model with "
                "build_model(cfg, num_classes, meta_dims, taxonomy=...)"
            )
        parent_classes = num_classes[t - 1] if t > 0 else None
        heads.append(
            build_head(
                kind,
                in_dim,
                n,
                parents=task_parents,
                parent_classes=parent_classes,
                routing=routing,
                temperature=temperature,
            )
        )
    return TaskHeads(heads)


__all__ = [
    "HEADS",
    "ROUTINGS",
    "ConditionalClassifierHead",
    "HierarchicalSoftmaxHead",
    "LinearHead",
    "TaskHeads",
    "build_head",
    "build_heads",
    "grouped_log_softmax",
    "head_kinds",
    "route",
]
