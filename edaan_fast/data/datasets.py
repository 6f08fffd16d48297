"""The data set registry (``DATASETS``, ``build_dataset``) and the Market-1501 and
DukeMTMC-reID readers; the folder layout they share is read by ``market_layout``. The registry
is the one list of data set names: the training and evaluation command lines offer its keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import DatasetError, ReIDDataset
from .market_layout import (  # noqa: F401  (re-exported: the layout's public names)
    DUKE_LAYOUT,
    DUKE_PATTERN,
    MARKET_LAYOUT,
    MARKET_PATTERN,
    SPLIT_DIRS,
    read_market_layout,
)


def market1501(root: str | Path) -> ReIDDataset:
    """Market-1501 (Zheng et al., ICCV 2015) from ``root`` or ``root/Market-1501-v15.09.15``."""
    return read_market_layout(root, "market1501",
                              ("", "Market-1501-v15.09.15", "market1501",
                               "market1501/Market-1501-v15.09.15"),
                              MARKET_PATTERN, MARKET_LAYOUT)


def dukemtmcreid(root: str | Path) -> ReIDDataset:
    """DukeMTMC-reID (Zheng et al., ICCV 2017) from ``root`` or ``root/DukeMTMC-reID``."""
    return read_market_layout(root, "dukemtmcreid",
                              ("", "DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID"),
                              DUKE_PATTERN, DUKE_LAYOUT)


def _cuhk03(root, **kwargs):
    from .cuhk03 import cuhk03
    return cuhk03(root, **kwargs)


def _prid2011(root, **kwargs):
    from .prid2011 import prid2011
    return prid2011(root, **kwargs)


def _msmt17(root, **kwargs):
    from .msmt17 import msmt17
    return msmt17(root, **kwargs)


def _custom(root, **kwargs):
    from .custom import custom
    return custom(root, **kwargs)


def _synthetic(root=None, **kwargs):
    from .synthetic import synthetic
    return synthetic(root, **kwargs)


DATASETS: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": market1501,
    "dukemtmcreid": dukemtmcreid,
    "cuhk03": _cuhk03,
    "prid2011": _prid2011,
    "msmt17": _msmt17,
    "custom": _custom,
    "synthetic": _synthetic,
}

#: Readers whose root may be a file (``custom``: a CSV) rather than a folder.
FILE_ROOTS = frozenset({"custom"})


def build_dataset(name: str, root: str | Path | None = None, **kwargs) -> ReIDDataset:
    """Build a registered data set.

    Args:
        name: one of ``DATASETS`` (``market1501``, ``dukemtmcreid``, ``cuhk03``,
            ``prid2011``, ``msmt17``, ``custom``, ``synthetic``).
        root: the data set's folder (for ``custom`` also a CSV file; for ``synthetic``: the
            cache root, default ``$EDAAN_FAST_DATA`` or ``~/.cache/edaan_fast``).
        **kwargs: reader options, e.g. ``split_id``/``protocol``/``image_type`` for CUHK03,
            ``direction``/``seed`` for PRID2011, ``with_val``/``version`` for MSMT17,
            ``domain``/``preset``/``seed`` for synthetic.
    """
    try:
        reader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; choices: {', '.join(sorted(DATASETS))}"
        ) from None
    if root is None and name != "synthetic":
        raise DatasetError(f"{name}: a root folder is required")
    if root is not None and name not in FILE_ROOTS:
        path = existing = Path(root).expanduser()
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            where = "is a file" if existing == path else f"is under {existing}, a file"
            raise DatasetError(f"{name}: the data root {path} {where}; expected a folder")
    return reader(root, **kwargs)
