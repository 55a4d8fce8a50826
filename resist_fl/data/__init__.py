"""Image data sets, federated partitions, transforms and PyTorch data loaders.

- :mod:`.sources`: which data sets exist (:data:`DATASETS`), their shapes, test sets
  and normalisation; :mod:`.hub` (CIFAR via flwr-datasets), :mod:`.npz` (a user's own
  images), :mod:`.synthetic` (generated in code);
- :mod:`.partitioning`: federated partitions (:data:`PARTITIONERS`);
- :mod:`.transforms`: augmentation (:data:`AUGMENTATIONS`) and normalisation;
- :mod:`.batches`: device-resident training and evaluation batches (:class:`TrainBatches`,
  :class:`EvalBatches`) over :class:`ImageArrays`.

Loaded data is cached per process, so repeated calls (one per round and client
in a simulation) do not reload or regenerate anything. Returned arrays are
always fresh copies and may be modified freely.
"""

from resist_fl.data.arrays import DataError, DatasetInfo, ImageArrays, arrays_from_hf, to_nchw
from resist_fl.data.batches import DeviceImages, EvalBatches, TrainBatches
from resist_fl.data.npz import NPZ_KEYS
from resist_fl.data.partitioning import PARTITIONERS, load_partition
from resist_fl.data.sources import DATASETS, dataset_info, load_test_set, normalization
from resist_fl.data.synthetic import (
    SYNTHETIC_NUM_CLASSES,
    SYNTHETIC_TEST_SIZE,
    SYNTHETIC_TRAIN_SIZE,
)
from resist_fl.data.transforms import AUGMENTATIONS, Normalization, crop_padding, image_statistics, resolve_augment

__all__ = [
    "AUGMENTATIONS", "DATASETS", "NPZ_KEYS", "PARTITIONERS", "SYNTHETIC_NUM_CLASSES", "SYNTHETIC_TEST_SIZE",
    "SYNTHETIC_TRAIN_SIZE", "DataError", "DatasetInfo", "DeviceImages", "ImageArrays", "Normalization",
    "arrays_from_hf",
    "crop_padding", "dataset_info", "image_statistics", "load_partition", "load_test_set", "EvalBatches",
    "TrainBatches", "normalization", "resolve_augment", "to_nchw",
]
