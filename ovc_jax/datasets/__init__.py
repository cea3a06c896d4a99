"""Datasets to certify: CIFAR-10, ImageNet, image folders and the toy world.

Modules:
  base           the `Dataset` interface, `load_dataset`, `subsample_indices`
  unpickle       `restricted_unpickle`: pickles of plain data, nothing called
  cifar          the `cifar-10-batches-py` layout, read and written
  download       the verified CIFAR-10 download, `safe_extract_tar`
  image_folders  image decoding, image folders and ImageNet's layout

Example:
  ds = datasets.load_dataset("cifar10", root)
  image, label = ds[datasets.subsample_indices(len(ds), 20)[0]]
"""

from ovc_jax.dataset_settings import DEFAULT_SKIP
from ovc_jax.datasets.base import DATASET_NAMES
from ovc_jax.datasets.base import DEFAULT_ROOTS
from ovc_jax.datasets.base import ArrayDataset
from ovc_jax.datasets.base import Dataset
from ovc_jax.datasets.base import ImageFileDataset
from ovc_jax.datasets.base import load_cifar10
from ovc_jax.datasets.base import load_dataset
from ovc_jax.datasets.base import load_image_folder
from ovc_jax.datasets.base import load_imagenet
from ovc_jax.datasets.base import load_toy
from ovc_jax.datasets.base import subsample_indices
from ovc_jax.datasets.cifar import CIFAR10_ARCHIVE_BYTES
from ovc_jax.datasets.cifar import CIFAR10_ARCHIVE_NAME
from ovc_jax.datasets.cifar import CIFAR10_DIRNAME
from ovc_jax.datasets.cifar import CIFAR10_MD5
from ovc_jax.datasets.cifar import CIFAR10_META
from ovc_jax.datasets.cifar import CIFAR10_SHA256
from ovc_jax.datasets.cifar import CIFAR10_TEST_BATCH
from ovc_jax.datasets.cifar import CIFAR10_TRAIN_BATCHES
from ovc_jax.datasets.cifar import CIFAR10_URL
from ovc_jax.datasets.cifar import find_cifar_folder
from ovc_jax.datasets.cifar import read_cifar_batch
from ovc_jax.datasets.cifar import read_cifar_folder
from ovc_jax.datasets.cifar import read_cifar_meta
from ovc_jax.datasets.download import download_cifar10
from ovc_jax.datasets.download import safe_extract_tar
from ovc_jax.datasets.image_folders import IMAGE_EXTENSIONS
from ovc_jax.datasets.image_folders import IMAGENET_CROP
from ovc_jax.datasets.image_folders import IMAGENET_NUM_CLASSES
from ovc_jax.datasets.image_folders import IMAGENET_RESIZE
from ovc_jax.datasets.image_folders import find_imagenet_folder
from ovc_jax.datasets.image_folders import load_image
from ovc_jax.datasets.unpickle import restricted_unpickle

__all__ = [
    "ArrayDataset", "CIFAR10_ARCHIVE_BYTES", "CIFAR10_ARCHIVE_NAME",
    "CIFAR10_DIRNAME", "CIFAR10_MD5", "CIFAR10_META", "CIFAR10_SHA256",
    "CIFAR10_TEST_BATCH", "CIFAR10_TRAIN_BATCHES", "CIFAR10_URL",
    "DATASET_NAMES", "DEFAULT_ROOTS", "DEFAULT_SKIP", "Dataset",
    "IMAGENET_CROP", "IMAGENET_NUM_CLASSES", "IMAGENET_RESIZE",
    "IMAGE_EXTENSIONS", "ImageFileDataset", "download_cifar10",
    "find_cifar_folder", "find_imagenet_folder", "load_cifar10",
    "load_dataset", "load_image", "load_image_folder", "load_imagenet",
    "load_toy", "restricted_unpickle", "read_cifar_batch",
    "read_cifar_folder", "read_cifar_meta", "safe_extract_tar",
    "subsample_indices",
]
