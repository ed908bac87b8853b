"""The containers every dataset source fills: `Split` and `Dataset`, uint8 arrays in host memory.

They live here, below every source, so that the readers (`jaxres.data.readers`), the shapes
generator (`jaxres.data.shapes`) and `jaxres.data.sources`, which dispatches to them and
caches what they return, can all build them without importing one another: `sources`
imports the readers and the generator, never the reverse. Users reach them as
`jaxres.data.Split` and `jaxres.data.Dataset`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxres.errors import JaxresError


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset, in host memory.

    images: uint8[N, H, W, 3] (RGB); labels: int32[N] in [0, num_classes);
    masks: bool[N, H, W] object masks, or None (only the synthetic 'shapes' source has them).
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None

    def __post_init__(self):
        images, labels, masks = self.images, self.labels, self.masks
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise JaxresError(f"Split images must be uint8[N, H, W, 3], got {images.dtype}{list(images.shape)}")
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise JaxresError(
                f"Split labels must be int32[{images.shape[0]}] to match the images, "
                f"got {labels.dtype}{list(labels.shape)}"
            )
        if masks is not None and (masks.dtype != np.bool_ or masks.shape != images.shape[:3]):
            raise JaxresError(f"Split masks must be bool{list(images.shape[:3])}, got {masks.dtype}{list(masks.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train and a test split sharing one image size and one list of class names.

    class_names: the name of each label, in label order; at least 2 (JaxresError otherwise).
    source: where the data came from, for humans (logs, dataset.json).
    """

    train: Split
    test: Split
    class_names: tuple[str, ...]
    source: str

    def __post_init__(self):
        names = tuple(self.class_names)
        if len(names) < 2:
            raise JaxresError(
                f"the dataset ({self.source}) has {len(names)} class{'' if len(names) == 1 else 'es'}"
                f"{' (' + ', '.join(map(str, names)) + ')' if names else ''}: a classifier needs at least 2 "
                "(with one, every prediction is right and the loss is 0)"
            )
