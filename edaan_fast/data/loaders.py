"""Loaders: one entry point, :func:`build_loader`, two backends with the same augmentations
(:mod:`edaan_fast.data.transforms`) and the same output, a :class:`Batch`.

- ``loader="torch"``: ``torch.utils.data.DataLoader`` over a map-style data set; images are
  decoded with ``torchvision.io`` and augmented with ``torchvision.transforms.v2`` in worker
  processes. Output tensors are on the CPU.
- ``loader="dali"``: an NVIDIA DALI pipeline fed by the same batch sampler through
  ``fn.external_source`` (the encoded file bytes). With a CUDA device it decodes on the GPU
  (``"mixed"``) and augments there, so the batch comes out on the GPU; otherwise it runs DALI's
  CPU pipeline (``device_id=None``) with ``num_workers`` threads. Needs
  ``pip install "edaan_fast[dali]"`` (``nvidia-dali-cuda130``).

The order of samples is the batch sampler's in both backends, so a PK-sampled epoch is the
same images whichever backend reads it. The random augmentations themselves come from
different generators and are not bit-identical across backends.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .base import DatasetError, Record, read_image
from .samplers import RandomBatchSampler, SequentialBatchSampler
from .transforms import AugmentConfig, build_transform, decode_file

logger = logging.getLogger(__name__)

LOADERS = ("torch", "dali")
DALI_HINT = ('the DALI loader needs NVIDIA DALI: pip install "edaan_fast[dali]" '
             "(or pip install nvidia-dali-cuda130)")


class LoaderFailure(RuntimeError):
    """The loader itself failed, not a file: the DALI pipeline raised, or (as the trainer
    reports it) a DataLoader worker process died."""


@dataclass
class Batch:
    """One batch. ``images``: float32 ``[B, 3, H, W]`` (normalised); ``pids``, ``camids``,
    ``index`` (position of each sample in the records list): int64 ``[B]``.

    Also readable like a dict: ``batch["images"]``.
    """

    images: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    index: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            raise KeyError(f"Batch has no field {key!r}; fields: {self.keys()}")
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def __len__(self) -> int:
        return int(self.pids.shape[0])

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(*(getattr(self, k).to(device, non_blocking=non_blocking)
                       for k in self.keys()))

    def pin_memory(self) -> Batch:
        return Batch(*(getattr(self, k).pin_memory() for k in self.keys()))


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class ImageDataset(Dataset):
    """Map-style data set over records: ``(image, pid, camid, index)`` per item."""

    def __init__(self, records: Sequence[Record], transform):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        return self.transform(decode_file(rec.path)), rec.pid, rec.camid, index


def collate(items) -> Batch:
    images, pids, camids, index = zip(*items)
    return Batch(torch.stack(images), torch.tensor(pids, dtype=torch.int64),
                 torch.tensor(camids, dtype=torch.int64), torch.tensor(index, dtype=torch.int64))


class ReIDLoader:
    """Iterable of :class:`Batch` over ``records`` in the order of ``sampler``.

    ``set_epoch`` and ``state_dict`` / ``load_state_dict`` forward to the sampler, except that
    the state records the batches *delivered* to the caller (the backends prefetch ahead), so
    a run resumed from a checkpoint continues with the next batch it had not seen.
    """

    def __init__(self, records: Sequence[Record], sampler, backend: str, cfg: AugmentConfig,
                 num_workers: int, seed: int, pin_memory: bool, device: str | None):
        self.records = list(records)
        self.sampler = sampler
        self.backend = backend
        self.cfg = cfg
        self.num_workers = num_workers
        self.seed = seed
        self._active: tuple[int, int] | None = None  # (epoch, position) at iteration start
        self._delivered = 0
        if backend == "dali" and not isinstance(getattr(sampler, "batch_size", None), int):
            raise ValueError("the DALI loader needs a batch sampler with an int `batch_size` "
                             f"attribute (the largest batch it yields); got {sampler!r}")
        if backend == "torch":
            self._loader = DataLoader(
                ImageDataset(self.records, build_transform(cfg)), batch_sampler=sampler,
                num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                persistent_workers=num_workers > 0,
                generator=torch.Generator().manual_seed(seed),
            )
        else:
            self._dali = _DaliBackend(self.records, cfg, sampler, num_workers, seed, device)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        if not hasattr(self.sampler, "state_dict"):
            return {}
        state = self.sampler.state_dict()
        if self._active is not None:
            state["epoch"], state["position"] = self._active[0], self._active[1] + self._delivered
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        stateful = hasattr(self.sampler, "state_dict")
        if stateful:
            start = self.sampler.state_dict()
            self._active = (start["epoch"], start["position"])
        self._delivered = 0
        exhausted = False
        source = self._loader if self.backend == "torch" else self._dali
        try:
            for batch in source:
                self._delivered += 1
                yield batch
            exhausted = True
        finally:
            if stateful and not exhausted:
                # stopped early: rewind the sampler past the prefetched, undelivered batches
                self.sampler.load_state_dict({**self.sampler.state_dict(),
                                              "epoch": self._active[0],
                                              "position": self._active[1] + self._delivered})
            if self.backend == "dali" and not exhausted:
                self._dali.discard()
            self._active = None


class _DaliSource:
    """``fn.external_source`` callable: the next batch of the sampler as encoded bytes."""

    def __init__(self, records: Sequence[Record], with_slots: bool):
        self.records = records
        self.with_slots = with_slots
        self.batches: Iterator[list[int]] | None = None
        self.in_flight: deque[list[int]] = deque()

    def __call__(self):
        if self.batches is None:
            raise StopIteration
        indices = next(self.batches)  # StopIteration ends the epoch
        self.in_flight.append(indices)
        files = []
        for i in indices:
            path = self.records[i].path
            try:
                files.append(np.fromfile(path, dtype=np.uint8))
            except OSError as exc:
                raise DatasetError(f"cannot read image file {path} ({exc})") from exc
        pids = np.array([self.records[i].pid for i in indices], dtype=np.int64)
        camids = np.array([self.records[i].camid for i in indices], dtype=np.int64)
        out = (files, pids, camids, np.asarray(indices, dtype=np.int64))
        if self.with_slots:  # each sample's place in its batch, for fn.multi_paste
            out += (np.arange(len(indices), dtype=np.int32).reshape(-1, 1),)
        return out


class _DaliBackend:
    def __init__(self, records, cfg: AugmentConfig, sampler, num_threads: int, seed: int,
                 device: str | None):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as exc:
            raise ImportError(DALI_HINT) from exc
        self.device, self.device_id = _dali_device(device)
        self.records, self.cfg, self.sampler = records, cfg, sampler
        self.num_threads, self.seed = max(1, num_threads), seed
        self.pipe = None
        self.source = None
        self._builds = 0

    def _build(self):
        self.source = _DaliSource(self.records, with_slots=self.cfg.train and self.cfg.pad > 0)
        self.pipe = _make_pipeline(self.source, self.cfg, self.device,
                                   batch_size=self.sampler.batch_size,
                                   num_threads=self.num_threads, device_id=self.device_id,
                                   seed=self.seed + self._builds)
        self._builds += 1
        self.pipe.build()

    def discard(self) -> None:
        """End an abandoned iteration (the trainer stops each epoch after its iterations):
        drain the batches the pipeline prefetched -- the caller rewinds the sampler past
        them -- and reset it, so the next epoch reuses the pipeline and its decoder instead of
        building (and initialising nvJPEG) again. A pipeline that fails to drain is dropped."""
        if self.pipe is None:
            return
        self.source.batches = iter(())
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.source.batches = None
            self.pipe.reset()
        except RuntimeError:
            self.pipe = None

    def __iter__(self) -> Iterator[Batch]:
        if self.pipe is None:
            self._build()
        self.source.in_flight.clear()
        self.source.batches = iter(self.sampler)
        while True:
            try:
                images, pids, camids, index = self.pipe.run()
            except StopIteration:
                break
            except RuntimeError as exc:
                self.pipe = None
                raise self._explain(exc) from exc
            self.source.in_flight.popleft()
            yield Batch(_to_torch(images, self.device, self.device_id), _to_torch(pids, "cpu"),
                        _to_torch(camids, "cpu"), _to_torch(index, "cpu"))
        self.source.batches = None
        self.pipe.reset()

    def _explain(self, exc: Exception) -> Exception:
        """Turn a DALI decode failure into an error naming the bad file(s)."""
        bad = []
        for indices in self.source.in_flight:
            for i in indices:
                try:
                    read_image(self.records[i].path)
                except DatasetError as err:
                    bad.append(str(err))
        if bad:
            return DatasetError("DALI pipeline failed on unreadable image(s):\n  "
                                + "\n  ".join(sorted(set(bad))))
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return LoaderFailure(f"the DALI pipeline failed: {lines[0] if lines else exc!r}")


def _dali_device(device) -> tuple[str, int | None]:
    """(DALI device, CUDA device id) of ``device``: ``"gpu"`` / ``"cpu"`` / ``None`` (the GPU
    when CUDA is available), or a torch device (``"cuda:1"``: decode on that GPU, the run's
    device rather than whichever is current)."""
    if device is None:
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", "gpu"):
        return device, (torch.cuda.current_device() if device == "gpu" else None)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"DALI device must be 'cpu', 'gpu', a torch device or None, got "
                         f"{device!r}")
    if dev.type == "cpu":
        return "cpu", None
    return "gpu", dev.index if dev.index is not None else torch.cuda.current_device()


def _to_torch(tensor_list, device: str, device_id: int | None = None) -> torch.Tensor:
    """Copy a DALI TensorList (uniform shape) into a new torch tensor: one memcpy."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.types import DALIDataType

    shape = [len(tensor_list), *tensor_list[0].shape()]
    dtype = {DALIDataType.FLOAT: torch.float32,
             DALIDataType.INT64: torch.int64}[tensor_list[0].dtype]
    if device == "gpu":
        out = torch.empty(shape, dtype=dtype, device=torch.device("cuda", device_id))
        feed_ndarray(tensor_list.as_tensor(), out,
                     cuda_stream=torch.cuda.current_stream(out.device))
    else:
        out = torch.empty(shape, dtype=dtype)
        feed_ndarray(tensor_list.as_tensor(), out)
    return out


def _make_pipeline(source, cfg: AugmentConfig, device: str, batch_size: int, num_threads: int,
                   device_id, seed: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, prefetch_queue_depth=2, exec_dynamic=True)
    def reid_pipeline():
        n_out = 5 if source.with_slots else 4
        jpegs, pids, camids, index, *slots = fn.external_source(
            source=source, num_outputs=n_out, batch=True, no_copy=False,
            dtype=[types.UINT8, types.INT64, types.INT64, types.INT64, types.INT32][:n_out])
        images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu",
                                   output_type=types.RGB)
        images = fn.resize(images, resize_x=cfg.width, resize_y=cfg.height,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = 0
        if cfg.train:
            if cfg.flip_p > 0:
                mirror = fn.random.coin_flip(probability=cfg.flip_p)
            if cfg.pad > 0:
                # zero-pad + random crop == the image shifted by (dy, dx) in [-pad, pad] onto a
                # black canvas: out[y, x] = img[y + dy, x + dx]. One multi_paste of each sample
                # onto a zeroed canvas does it in one pass (measured faster than fn.slice with
                # out_of_bounds_policy="pad", same pixels).
                shift = fn.cast(fn.random.uniform(
                    values=[float(v) for v in range(-cfg.pad, cfg.pad + 1)], shape=[2]),
                    dtype=types.INT32)
                src_start = dmath.max(shift, 0)
                dst_start = dmath.max(-shift, 0)
                extent = (src_start + dst_start) * -1 + np.array([cfg.height, cfg.width],
                                                                 np.int32)
                images = fn.multi_paste(
                    images, in_ids=slots[0], output_size=[cfg.height, cfg.width],
                    in_anchors=fn.reshape(src_start, shape=[1, 2]),
                    out_anchors=fn.reshape(dst_start, shape=[1, 2]),
                    shapes=fn.reshape(extent, shape=[1, 2]))
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
            mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std])
        return images, pids, camids, index

    return reid_pipeline()


def build_loader(records: Sequence[Record], *, loader: str = "torch", train: bool = True,
                 sampler=None, batch_size: int = 32, num_workers: int = 2,
                 image_size: tuple[int, int] = (256, 128), seed: int = 0, pad: int = 10,
                 flip_p: float = 0.5, pin_memory: bool = False,
                 device: str | None = None) -> ReIDLoader:
    """Build a loader over ``records`` yielding :class:`Batch` objects.

    Args:
        records: the split to read (``dataset.train``, ``dataset.query``, ...).
        loader: ``"torch"`` or ``"dali"``.
        train: augment (flip, pad + crop) or not (resize + normalise only).
        sampler: a batch sampler (:class:`PKSampler`, :class:`RandomBatchSampler`, ...);
            default: random full batches for training, in-order batches for evaluation.
        batch_size: used by the default sampler only (a given sampler fixes its own).
        num_workers: DataLoader worker processes / DALI CPU threads.
        image_size: output ``(H, W)`` (256 x 128 in the paper).
        seed: seeds the default sampler and the augmentation generators.
        pad, flip_p: the augmentation's padding (pixels) and flip probability.
        pin_memory: pin the torch loader's batches (for fast host-to-GPU copies).
        device: DALI only: ``"gpu"`` (the current GPU), ``"cpu"``, a torch device (``cuda:1``:
            decode on that GPU), or ``None`` = the current GPU when CUDA is available.
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choices: {', '.join(LOADERS)}")
    if not records:
        raise DatasetError("build_loader: the records list is empty")
    if loader == "dali" and not dali_available():
        raise ImportError(DALI_HINT)
    height, width = image_size
    cfg = AugmentConfig(height=height, width=width, train=train, flip_p=flip_p, pad=pad)
    if sampler is None:
        sampler = (RandomBatchSampler(len(records), batch_size, seed=seed) if train
                   else SequentialBatchSampler(len(records), batch_size))
    return ReIDLoader(records, sampler, loader, cfg, num_workers, seed, pin_memory, device)
