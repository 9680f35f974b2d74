"""Datasets that also return each sample's index (needed by CRD's memory bank)."""

from __future__ import annotations

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wrap a dataset yielding ``(x, y)`` so it yields ``(x, y, index)``; ``index`` in ``[0, len(dataset))``.

    ``fit`` passes the third batch element to the objective as ``index``. ``len`` is the ``n_data`` CRD needs.

    Args:
        dataset: any map-style dataset whose items are ``(x, y, ...)``.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return item[0], item[1], index
