"""CycleGAN's image buffer (Shrivastava et al. 2017): discriminators are updated with a mix of
the newest translations and up to ``pool_size`` older ones, which damps oscillation.

Same policy as CycleGAN's ``ImagePool``: while the pool is not full every new image is stored
and returned; afterwards each new image is, with probability 1/2, returned as is, or swapped for
a uniformly chosen stored image (which is returned, the new one taking its place). Unlike
CycleGAN's, the randomness comes from the pool's own ``torch.Generator``, and
:meth:`ImagePool.state_dict` holds the stored images and that generator's state, so a resumed
run continues exactly where it stopped.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ImagePool"]


class ImagePool:
    """A buffer of up to ``pool_size`` past images; ``pool_size=0`` disables it."""

    def __init__(self, pool_size: int = 50, seed: int = 0):
        if pool_size < 0:
            raise ValueError(f"ImagePool: pool_size must be >= 0, got {pool_size}")
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Returns a batch like ``images`` ``[N, ...]`` drawn from the pool and the new images.

        The inputs are stored detached; the result never carries a graph.
        """
        images = images.detach()
        if self.pool_size == 0:
            return images
        out = []
        for image in images:
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator).item() < 0.5:
                out.append(image)
            else:
                i = int(torch.randint(len(self.images), (), generator=self.generator).item())
                old = self.images[i]
                if old.shape != image.shape:
                    raise ValueError(f"ImagePool: images must keep one shape; the pool holds "
                                     f"{list(old.shape)}, got {list(image.shape)}")
                self.images[i] = image.clone()
                out.append(old.to(device=image.device, dtype=image.dtype))
        return torch.stack(out) if out else images

    def clear(self) -> None:
        """Empties the pool (e.g. when what the discriminator sees changes)."""
        self.images = []

    def state_dict(self) -> dict[str, Any]:
        images = torch.stack(self.images).cpu() if self.images else None
        return {"pool_size": self.pool_size, "images": images,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool_size = int(state["pool_size"])
        images = state["images"]
        self.images = [] if images is None else [im.clone() for im in images]
        self.generator.set_state(state["generator"])
        if len(self.images) > self.pool_size:
            raise ValueError(f"ImagePool.load_state_dict: {len(self.images)} images for a pool of "
                             f"{self.pool_size}")

    def to(self, device: torch.device | str) -> "ImagePool":
        """Moves the stored images (e.g. after loading a checkpoint on CPU)."""
        self.images = [im.to(device) for im in self.images]
        return self
