"""The open logging window: training losses summed on the device between two ``train/*`` rows.

It is part of every checkpoint, so the first row after a resume averages the same steps as the row
of an uninterrupted run.
"""

from __future__ import annotations

import time

import torch

from linnaeus.dist import all_reduce_sum


class LogWindow:
    def __init__(self, num_tasks: int, device: torch.device) -> None:
        self.num_tasks = num_tasks
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(1 + self.num_tasks, device=self.device)  # total, then per task
        self.steps = 0
        self.images = 0
        self.train_seconds = 0.0  # closed stretches of training time; the open one runs from _since
        self._since: float | None = time.perf_counter()

    def add(self, loss: torch.Tensor, task_losses: torch.Tensor, images: int) -> None:
        """One micro-batch's (already accumulation-weighted) losses; no host sync."""
        self.loss[0] += loss.detach().float()
        self.loss[1:] += task_losses.detach().float()
        self.images += images

    def pause(self) -> None:
        """Stop the clock (validation and checkpoints are not training time)."""
        self.train_seconds = self.seconds()
        self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def seconds(self) -> float:
        """Training time in this window so far, paused or not."""
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return self.train_seconds + running

    def reduced(self) -> torch.Tensor:
        """Loss sums over all ranks, on the CPU (a host sync)."""
        return all_reduce_sum(self.loss.clone()).cpu()

    def state_dict(self, reduced: torch.Tensor) -> dict:
        return {
            "loss": reduced.tolist(),
            "steps": self.steps,
            "images": self.images,
            "train_seconds": self.seconds(),
        }

    def load_state_dict(self, state: dict, is_main: bool) -> None:
        """Rank 0 takes the saved (all-rank) sums; the other ranks start from zero, so the next
        reduction adds up to the same totals."""
        if is_main:
            self.loss = torch.tensor(state["loss"], dtype=torch.float32, device=self.device)
        self.steps = state["steps"]
        self.images = state["images"]
        self.train_seconds = state["train_seconds"]
        self._since = time.perf_counter()
