"""Batch tensors the loader writes again instead of allocating: page faults are a third of decoding.

Writing a freshly allocated 64 x 3 x 224 x 224 uint8 batch costs about 6 ms of page faults on a
2-core VM (~95 us per image, against ~250 us to decode the JPEG); writing one written before costs
under 1 ms. ``BatchBuffers.take`` hands out such buffers:

- in the main process (``data.num_workers=0``): a buffer is reused once no tensor, view or array
  other than the pool's own refers to it (reference counts);
- in a loader worker: each worker owns ``slots`` buffers in shared memory and a row of the shared
  ``busy`` table. A batch written into slot k leaves the worker as a ``Lease`` in place of its images
  tensor; unpickled in the main process, the lease turns back into a tensor over the slot and
  watches it there, clearing the slot's flag once the last tensor or view on it is gone, so the
  worker writes into that slot again only then. The slot's memory travels once, with its first
  lease; the main process keeps it mapped, and later leases carry only the slot's number (a shared
  tensor sent by PyTorch costs a file-descriptor hand-over through the worker's resource-sharer
  thread and a fresh memory map, per tensor and batch). A shorter batch (an epoch's last) is
  written into the front of its slot. With every slot busy (a consumer holding many batches) a
  worker falls back to fresh shared memory, as PyTorch's own collate does.
- ``Inline`` wraps the batch's small tensors (targets, metadata, indices) so that they travel inside
  the pickled message rather than each through a shared-memory segment of its own.

The batch's images may be laid out channels-last (``channels_last=True``: (B, 3, H, W) over (B, H, W, 3)
memory), which is how the decoders return pixels: stacking is then a plain copy instead of a
transposition (~45 us per 224 px image), and JPEGs of the row's size decode straight into their rows.
The loader does this by default; ``DataBundle.prepare`` casts the batch to contiguous float in the
same pass (on a CPU ~35 us per 224 px image more than from contiguous uint8, nothing worth measuring
on a GPU).

A uint8 image batch starts ``ROW_SHIFT`` (16) bytes into its allocation, so that its rows and pixel
lines, whose lengths are multiples of 32 bytes at the usual sizes, do not start on 32-byte
boundaries: libjpeg-turbo (through simplejpeg) decodes 5-7 % slower into 32-byte aligned lines at 224
and 256 px on an AMD EPYC VM (152 against 142 us per 224 px image, 15 % at 96 px) and equally fast at
any other offset (8, 16, 24, 48 bytes); ``scripts/bench_loader.py --compare`` measures both.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import weakref
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

_POOLS: weakref.WeakValueDictionary[int, BatchBuffers] = weakref.WeakValueDictionary()  # by id, where made
_IDS = itertools.count()
_TOKENS = itertools.count()
INLINE_BYTES = 1 << 16  # larger tensors go through shared memory, as PyTorch sends them
NUMPY_TRANSPOSE_MIN = 3 * 64 * 64  # uint8 images from this many values transpose faster through NumPy
ROW_SHIFT = 16  # bytes between an allocation's (aligned) start and a uint8 image batch (module docstring)


def _storage_uses(tensor: torch.Tensor) -> int:
    """How many tensors (views included) share ``tensor``'s memory."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class Lease(NamedTuple):
    """Rows ``[:count]`` of slot ``slot`` of pool ``pool`` hold the batch: what a worker sends instead
    of the images tensor. Unpickled (in the main process) it is a tensor over the slot again, watched
    until nobody holds it. ``memory`` (the slot's whole buffer) travels only with a slot's first lease
    after (re)allocation, ``token`` tells the allocations apart; ``permuted``: the memory is
    (B, H, W, C), the batch its (B, C, H, W) view."""

    pool: int
    slot: int
    token: tuple[int, int]
    count: int
    memory: torch.Tensor | None
    permuted: bool = False

    def __reduce__(self):
        return _watch, tuple(self)


def _watch(
    pool: int,
    slot: int,
    token: tuple[int, int],
    count: int,
    memory: torch.Tensor | None,
    permuted: bool = False,
) -> torch.Tensor:
    """The batch tensor of a lease, in the main process: rows ``[:count]`` of the slot's memory, in a
    storage of its own whose end releases the slot."""
    buffers = _POOLS.get(pool)
    if buffers is None:  # not the process that made the pool: the memory must have come along
        if memory is None:
            raise RuntimeError(
                f"a batch lease for slot {slot} of an unknown buffer pool arrived without memory"
            )
        rows = memory[:count].clone()
        return rows.permute(0, 3, 1, 2) if permuted else rows
    if memory is not None:
        buffers.mapped[slot] = (token, memory)
    known = buffers.mapped.get(slot)
    if known is None or known[0] != token:
        raise RuntimeError(f"a batch lease for slot {slot} names memory this process never received")
    base = known[1]
    # a new storage over the same memory (NumPy keeps ``base`` alive), so the batch's lifetime is its own
    rows = torch.from_numpy(base.numpy()[:count])
    weakref.finalize(rows.untyped_storage(), buffers.release, slot)
    return rows.permute(0, 3, 1, 2) if permuted else rows


class Inline:
    """A small tensor that travels inside the pickled batch (by value) instead of through a
    shared-memory segment and a file-descriptor hand-over of its own."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.array = tensor.numpy()

    def __reduce__(self):
        return torch.from_numpy, (self.array,)


def travelling(tensor: torch.Tensor) -> torch.Tensor | Inline:
    """``tensor`` as a loader worker should send it: ``Inline`` when small, itself otherwise (and in
    the main process, where nothing travels)."""
    if get_worker_info() is None or tensor.numel() * tensor.element_size() > INLINE_BYTES:
        return tensor
    return Inline(tensor)


def copy_image(row: torch.Tensor, image: torch.Tensor) -> None:
    """``row.copy_(image)`` for a CPU image of ``row``'s shape. A uint8 image over (H, W, C) memory
    (as decoders return pixels) going into a planar row is a transposition, which NumPy's strided copy
    does in about half of torch's time from 64 px on (63 against 125 us at 224 px on a 2-core VM)."""
    if (
        image.dtype == row.dtype == torch.uint8
        and image.numel() >= NUMPY_TRANSPOSE_MIN
        and row.is_contiguous()
        and not image.is_contiguous()
    ):
        try:
            np.copyto(row.numpy(), image.numpy())
            return
        except TypeError:  # not in CPU memory after all
            pass
    row.copy_(image)


def _decoded_rows(
    out: torch.Tensor, decode_rows: Callable[[range, np.ndarray], list[bool]] | None
) -> list[bool] | None:
    """``decode_rows`` over rows 1 on of a uint8 RGB batch over channels-last memory (else None)."""
    if decode_rows is None or len(out) < 2 or out.dtype != torch.uint8 or out.shape[1] != 3:
        return None
    memory = out.permute(0, 2, 3, 1)
    if not memory.is_contiguous():
        return None  # planar rows: a decoder cannot write them
    return decode_rows(range(1, len(out)), memory.numpy()[1:])


class BatchBuffers:
    """The batch buffers of one dataset (module docstring): ``slots`` per loader worker (``workers``
    of them, with a shared ``busy`` flag each), and up to ``slots`` in the main process."""

    def __init__(self, workers: int = 0, slots: int = 4, channels_last: bool = False) -> None:
        self.slots, self.channels_last = slots, channels_last
        self.local: list[torch.Tensor] = []  # main process only
        self.track = hasattr(torch._C, "_storage_Use_Count")
        self._idle: tuple[int, int] | None = None  # the reference counts of a buffer nobody else holds
        self.busy = torch.zeros(workers * slots, dtype=torch.uint8).share_memory_() if workers else None
        self._flags: np.ndarray | None = None  # ``busy`` as NumPy, made in the process that uses it
        self._rows = 0  # in a worker: the most rows a batch had, what a new slot is made for
        self.owned: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}  # in a worker: its slots
        self.sent: set[int] = set()  # in a worker: slots whose memory the main process has
        self.mapped: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}  # in the main process
        self.id = next(_IDS)
        _POOLS[self.id] = self

    def __getstate__(self) -> dict:
        # buffers stay in their process
        return {
            **self.__dict__,
            "local": [],
            "owned": {},
            "sent": set(),
            "mapped": {},
            "_flags": None,
            "_rows": 0,
        }

    @property
    def flags(self) -> np.ndarray:
        """The shared ``busy`` table through NumPy: a flag read or written in ~50 ns, where a tensor
        element costs ~1 us and may hand the GIL to the process's queue thread in between (seen as
        ~100 us per batch in the main process)."""
        if self._flags is None:
            self._flags = self.busy.numpy()
        return self._flags

    def _permuted(self, shape: tuple[int, ...]) -> bool:
        return self.channels_last and len(shape) == 4

    def _memory_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], shape[2], shape[3], shape[1]) if self._permuted(shape) else shape

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, shared: bool = False, layout: bool = True
    ) -> torch.Tensor:
        """An uninitialised batch tensor (channels-last for image batches when asked), in shared
        memory when ``shared`` (what a worker's batch travels through). ``layout=False``: the memory
        itself, (B, H, W, 3) for a channels-last batch."""
        memory = self._memory_shape(shape)
        shift = ROW_SHIFT if dtype == torch.uint8 and len(shape) == 4 else 0
        size = math.prod(memory) * torch.empty((), dtype=dtype).element_size() + shift
        storage = torch.UntypedStorage._new_shared(size) if shared else torch.UntypedStorage(size)
        out = torch.empty(0, dtype=dtype).set_(storage, shift, memory)
        return out.permute(0, 3, 1, 2) if layout and self._permuted(shape) else out

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Lease | None]:
        """A buffer of ``shape``/``dtype`` to write a batch into, and the lease to send instead of it
        (None: send the tensor itself)."""
        info = get_worker_info()
        if info is None:
            return self._take_local(shape, dtype), None
        return self._take_slot(info.id, shape, dtype)

    @staticmethod
    def _uses(buffer: torch.Tensor) -> tuple[int, int]:
        return sys.getrefcount(buffer), _storage_uses(buffer)

    def _take_local(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.track:
            for buffer in self.local:
                if buffer.shape == shape and buffer.dtype == dtype and self._uses(buffer) == self._idle:
                    return buffer
        buffer = self.empty(shape, dtype)
        if self.track and len(self.local) < self.slots:
            self.local.append(buffer)
            self._idle = self._uses(buffer)  # counted as in the loop above: the list, this name, the call
        return buffer

    def _take_slot(self, worker: int, shape: tuple[int, ...], dtype: torch.dtype):
        if self.busy is not None and (worker + 1) * self.slots <= len(self.busy):
            flags = self.flags
            self._rows = max(self._rows, shape[0])
            for slot in range(worker * self.slots, (worker + 1) * self.slots):
                if flags[slot]:
                    continue
                token, memory = self.owned.get(slot, (None, None))
                if (
                    memory is None
                    or memory.shape[1:] != self._memory_shape(shape)[1:]
                    or (memory.dtype != dtype or len(memory) < shape[0])
                ):
                    token = (os.getpid(), next(_TOKENS))
                    # a slot first used by an epoch's short last batch still fits the full ones
                    rows = max(shape[0], self._rows)
                    memory = self.empty((rows, *shape[1:]), dtype, shared=True, layout=False)
                    self.owned[slot] = (token, memory)
                    self.sent.discard(slot)
                flags[slot] = 1
                first = slot not in self.sent
                self.sent.add(slot)
                permuted = self._permuted(shape)
                lease = Lease(self.id, slot, token, shape[0], memory if first else None, permuted)
                rows = memory[: shape[0]]
                return (rows.permute(0, 3, 1, 2) if permuted else rows), lease
        return self.empty(shape, dtype, shared=True), None

    def fill(
        self,
        sample: Callable[[int, torch.Tensor | None], torch.Tensor],
        count: int,
        decode_rows: Callable[[range, np.ndarray], list[bool]] | None = None,
        finish: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | Lease:
        """A batch of the images ``sample(k, row)`` makes for k < ``count``, written into a buffer one by
        one: the tensor, or in a worker the lease that becomes the tensor in the main process.
        ``row`` is the batch row image k goes to (None for the first, which sets the batch's shape):
        ``sample`` may write the image there itself and return ``row``, saving a copy.

        ``decode_rows`` and ``finish``: a batch of images in one go. When the batch is uint8 RGB over
        channels-last memory, ``decode_rows(range(1, count), pixels)`` gets the (count - 1, H, W, 3)
        NumPy rows of images 1 on, decodes what it can straight into them and says which; image k so
        decoded is then made by ``finish(k, row)`` from its row (None: the row is the image), the
        others by ``sample``."""
        first = sample(0, None)
        out, lease = self.take((count, *first.shape), first.dtype)
        try:
            rows = out.unbind(0)
            copy_image(rows[0], first)
            decoded = _decoded_rows(out, decode_rows)
            for k in range(1, count):
                row = rows[k]
                if decoded and decoded[k - 1]:
                    if finish is None:
                        continue  # decoded into its row, final
                    image = finish(k, row)
                else:
                    image = sample(k, row)
                if image is row:
                    continue  # decoded into its row
                if image.shape != first.shape:
                    raise ValueError(
                        f"the images of one batch must have one size; image {k} is {tuple(image.shape)}, "
                        f"image 0 {tuple(first.shape)}"
                    )
                if image.data_ptr() == row.data_ptr() and image.stride() == row.stride():
                    continue  # written in place
                if image.untyped_storage().data_ptr() == row.untyped_storage().data_ptr():
                    image = image.clone()  # some other view of the batch's memory: copy it off first
                copy_image(row, image)
        except BaseException:  # e.g. a bad image: the batch never leaves, so its slot is free again
            if lease is not None:
                if lease.memory is not None:
                    self.sent.discard(lease.slot)
                self.release(lease.slot)
            raise
        return out if lease is None else lease

    def release(self, slot: int) -> None:
        """The main process is done with the batch in ``slot``: its worker may write there again."""
        self.flags[slot] = 0
