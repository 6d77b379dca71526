"""``data.batch_size=auto``: the largest per-device batch that fits in accelerator memory.

A trial forward and backward pass (no optimizer step) on a throw-away copy of the model, with
random inputs of the training shape, under the run's precision; batch sizes double until one does
not fit, then a binary search finds the edge. The result is scaled by ``data.auto_batch.safety``
(room for the optimizer state, which a trial without steps does not allocate, and for fragmentation),
agreed across ranks (the minimum) and stored in the run's config, so a resumed run uses it again.
The RNG states are restored afterwards: the trial leaves no trace in the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from linnaeus.checkpoint import capture_rng, restore_rng
from linnaeus.errors import ConfigError

log = logging.getLogger(__name__)


def search_batch_size(fits: Callable[[int], bool], *, start: int = 8, limit: int = 4096) -> int:
    """The largest batch size in ``[1, limit]`` for which ``fits`` holds (``fits`` monotone), 0 if none."""
    good, bad = 0, None
    size = min(start, limit)
    while size <= limit:  # double until a size fails
        if not fits(size):
            bad = size
            break
        good = size
        if size == limit:
            return good
        size = min(2 * size, limit)
    if bad is None:
        return good
    low, high = good, bad  # low fits (or is 0), high does not
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def apply_safety(largest: int, safety: float) -> int:
    if not 0 < safety <= 1:
        raise ConfigError(f"data.auto_batch.safety must lie in (0, 1], got {safety}")
    return max(1, int(largest * safety))


def cuda_trial(
    build_model: Callable[[], torch.nn.Module],
    loss_fn: Callable,
    *,
    image_size: int,
    meta_dims: dict[str, int],
    num_classes: list[int],
    device: torch.device,
    autocast,
) -> Callable[[int], bool]:
    """``fits(batch_size)``: one forward/backward of a fresh model copy on random inputs."""
    model = build_model().to(device)
    model.train()

    def fits(batch: int) -> bool:
        images = torch.randn(batch, 3, image_size, image_size, device=device)
        meta = {k: torch.randn(batch, d, device=device) for k, d in meta_dims.items()}
        valid = {k: torch.ones(batch, dtype=torch.bool, device=device) for k in meta_dims}
        targets = torch.stack([torch.randint(1, n, (batch,), device=device) for n in num_classes], dim=1)
        try:
            with autocast:
                logits = model(images, meta, valid)
                loss, _ = loss_fn(logits, targets)
            loss.backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            del images, meta, valid, targets
            torch.cuda.empty_cache()

    return fits


def find_batch_size(fits: Callable[[int], bool], *, safety: float, limit: int, device: torch.device) -> int:
    if device.type != "cuda":
        raise ConfigError(
            f"data.batch_size=auto measures accelerator memory, and this run is on {device}; "
            "set a number instead (e.g. data.batch_size=64)"
        )
    rng = capture_rng()
    try:
        largest = search_batch_size(fits, limit=limit)
    finally:
        restore_rng(rng)
        torch.cuda.empty_cache()
    if largest == 0:
        raise ConfigError("data.batch_size=auto: not even a batch of 1 fits in accelerator memory")
    found = apply_safety(largest, safety)
    log.info(
        "data.batch_size=auto: %d per device (largest that fits %d x safety %.2f)", found, largest, safety
    )
    return found
