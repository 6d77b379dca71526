"""GradNorm (Chen et al. 2018): task weights that balance the ranks' gradient norms.

Each task's gradient norm on the last shared layer, ``G_i = w_i * ||grad_W L_i||``, is pulled towards
``mean(G) * r_i ** alpha`` with ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``: a rank that trains
slower than the others (larger loss ratio) gets a larger weight. After every update the weights are
renormalised to sum to the number of tasks.

Under gradient accumulation the update uses the last micro-batch of the optimizer step. Under DDP
the per-task gradients of the shared layer and the losses are averaged over ranks first (as DDP
averages the model's gradients), so every rank takes the same update and the weights stay equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def gradnorm_loss(
    weights: torch.Tensor, grad_norms: torch.Tensor, loss_ratios: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``sum_i |w_i g_i - mean(w g) * r_i ** alpha|``, the target held constant (as in the paper).

    ``grad_norms`` g_i = ||grad_W L_i|| (unweighted, detached), ``loss_ratios`` L_i / L_i(0).
    """
    norms = weights * grad_norms
    relative = loss_ratios / loss_ratios.mean()
    target = (norms.mean() * relative**alpha).detach()
    return (norms - target).abs().sum()


def task_gradients(task_losses: torch.Tensor, params: list[nn.Parameter], scale: float = 1.0) -> torch.Tensor:
    """The gradient of every task loss with respect to ``params``, flattened: (T, P).

    ``torch.autograd.grad`` with ``retain_graph``: the model's ``backward`` still follows. It touches
    no ``.grad`` and fires no DDP hook. ``scale`` (the fp16 loss scale) is divided out again.
    """
    rows = []
    for loss in task_losses:
        if not loss.requires_grad:
            rows.append(torch.cat([torch.zeros_like(p).flatten() for p in params]))
            continue
        grads = torch.autograd.grad(loss * scale, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])
        )
    return torch.stack(rows).float() / scale


def _mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


class GradNorm(nn.Module):
    """Learnable task weights with their own Adam optimizer; saved with the loss module's state."""

    def __init__(self, num_tasks: int, *, alpha: float, lr: float, update_every: int) -> None:
        super().__init__()
        if update_every < 1:
            raise ValueError(f"loss.gradnorm.update_every must be >= 1, got {update_every}")
        self.alpha, self.update_every = alpha, update_every
        self.weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))
        self.optimizer = torch.optim.Adam([self.weights], lr=lr)

    def update(
        self,
        step: int,
        task_losses: torch.Tensor | None,
        shared_params: list[nn.Parameter],
        *,
        loss_scale: float = 1.0,
    ) -> bool:
        """One GradNorm step when ``step`` is due; identical on every rank. Returns whether it ran."""
        if step % self.update_every != 0 or task_losses is None or not task_losses.requires_grad:
            return False
        if not shared_params:
            raise ValueError(
                "GradNorm needs the model's shared_parameters() (the last layer all heads share)"
            )
        grads = _mean_over_ranks(task_gradients(task_losses, shared_params, loss_scale))  # (T, P)
        losses = _mean_over_ranks(task_losses.detach().float().clone())
        grad_norms = grads.norm(dim=1)
        if not (torch.isfinite(grad_norms).all() and torch.isfinite(losses).all()):
            return False  # an fp16 overflow step: skipped on every rank alike
        with torch.no_grad():
            fresh = torch.isnan(self.initial_losses) & (losses > 0)
            self.initial_losses.copy_(torch.where(fresh, losses, self.initial_losses))
        if not ((losses > 0).all() and (self.initial_losses > 0).all()):
            return False  # a rank without any known label in this batch: no ratio to compare
        loss = gradnorm_loss(self.weights, grad_norms, losses / self.initial_losses, self.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.grad = torch.autograd.grad(loss, self.weights)[0]
        self.optimizer.step()
        with torch.no_grad():
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(len(self.weights) / self.weights.sum())
        return True

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
