"""The images of a vision study: where they come from, how they are split, their fingerprint.

``task.data`` names the source; nothing is downloaded and nothing is unpickled:

  "digits"       scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1,797 8×8 images of
                 0..16, 10 classes; shipped with scikit-learn, the ``vision`` extra)
  a directory    MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
                 ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``), or the
                 CIFAR-10 binary version (``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin``;
                 records of a label byte and 3,072 pixel bytes, red, green, blue planes of 32×32), or the
                 CIFAR-100 binary version (``train.bin``, ``test.bin``; a coarse and a fine label byte, then
                 the pixels; the fine label is used), also inside a ``cifar-10-batches-bin`` /
                 ``cifar-100-binary`` folder
  a ``.npz``     ``images`` (``[N, H, W]`` or ``[N, H, W, C]``, uint8 or real) and ``labels`` (``[N]``
                 integers), optionally ``test_images`` and ``test_labels``; read with ``allow_pickle=False``

A source without its own test split (digits, an ``.npz`` without ``test_images``) is split by a permutation
seeded with ``task.split_seed``: ``task.test_frac`` of the images are held out. ``task.max_train`` and
``task.max_test`` (0: all) keep a random subset of each split (the same permutation seed). The fingerprint
(a hash of every file's name, size and contents, and of the split settings) is written into the study's
config, so a relaunch or a replay on other data is refused instead of silently training on it.

Any malformed file (truncated, a wrong magic number, labels out of range, a pickled ``.npz``) is a one-line
``DataError``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import math
import os
import zipfile

import numpy as np

DIGITS = "digits"
FORMATS = ("auto", "digits", "idx", "cifar10", "cifar100", "npz")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR10 = (tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",))
_CIFAR100 = (("train.bin",), ("test.bin",))
_CIFAR_SUBDIRS = ("cifar-10-batches-bin", "cifar-100-binary")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
MAX_CLASSES = 1 << 16


class DataError(ValueError):
  """A data source that cannot be used (missing, malformed, inconsistent); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The images of a study, split.

  Attributes:
    name: the source as given (``task.data``).
    format: the format read ("digits", "idx", "cifar10", "cifar100", "npz").
    files: the files read, relative to the source.
    train_images, test_images: ``[N, H, W, C]`` uint8 (or float32 for real-valued ``.npz`` images).
    train_labels, test_labels: int32 ``[N]`` in ``[0, classes)``.
    classes: the number of classes.
    fingerprint: hex digest of the files' names, sizes, contents and the split settings.
  """
  name: str
  format: str
  files: tuple[str, ...]
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  classes: int
  fingerprint: str

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(v) for v in self.train_images.shape[1:])

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """float32 per-channel mean and std of the training images (std floored at 1e-6)."""
    x = self.train_images.reshape(-1, self.train_images.shape[-1])
    mean = np.zeros(x.shape[1])
    sq = np.zeros(x.shape[1])
    for a in range(0, len(x), 1 << 20):  # float64 sums in chunks: no float64 copy of all the images
      chunk = x[a:a + (1 << 20)].astype(np.float64)
      mean += chunk.sum(0)
      sq += (chunk * chunk).sum(0)
    mean /= len(x)
    std = np.sqrt(np.maximum(sq / len(x) - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Readers.


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror}") from None
  if path.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise DataError(f"{path}: not a readable gzip file ({e})") from None
  return data


def read_idx(path: str) -> np.ndarray:
  """The array of an IDX file (MNIST's format: 0, 0, a type byte, the rank, big-endian int32 sizes)."""
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or not 1 <= data[3] <= 4:
    raise DataError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
  ndim = data[3]
  if len(data) < 4 + 4 * ndim:
    raise DataError(f"{path}: truncated IDX header")
  shape = tuple(int(v) for v in np.frombuffer(data, ">u4", ndim, 4))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  need = math.prod(shape) * dtype.itemsize  # Python integers: a forged header cannot overflow the check
  have = len(data) - 4 - 4 * ndim
  if have < need:
    raise DataError(f"{path}: truncated ({have:,} data bytes, the header declares {need:,} for {shape})")
  if have > need:
    raise DataError(f"{path}: {have - need:,} bytes beyond the {shape} the header declares")
  return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)


def read_cifar(path: str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """Images ``[N, 32, 32, 3]`` uint8 and labels of a CIFAR binary file (each record's last label byte)."""
  data = _read_bytes(path)
  record = label_bytes + 3072
  if not data or len(data) % record:
    raise DataError(f"{path}: {len(data):,} bytes is not a whole number of {record}-byte CIFAR records "
                    "(truncated, or the other CIFAR version)")
  rec = np.frombuffer(data, np.uint8).reshape(-1, record)
  images = rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), rec[:, label_bytes - 1].astype(np.int32)


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` file, never unpickled."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: np.asarray(z[k]) for k in z.files}
  except ValueError as e:
    if "allow_pickle" in str(e) or "pickle" in str(e).lower():
      raise DataError(f"{path}: holds pickled objects; only numeric arrays are read (allow_pickle=False)") \
          from None
    raise DataError(f"{path}: unreadable npz ({e})") from None
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"{path}: not a readable npz file ({e})") from None


def _labels(labels, path: str, what: str, classes: int | None = None) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.uint8):
    raise DataError(f"{path}: {what} must be integers [N], got {labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= (classes or MAX_CLASSES)):
    bad = labels[(labels < 0) | (labels >= (classes or MAX_CLASSES))][0]
    raise DataError(f"{path}: {what} has label {int(bad)} out of range [0, {classes or MAX_CLASSES})")
  return labels.astype(np.int32)


def _images(images, path: str, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or min(images.shape[1:]) < 1:
    raise DataError(f"{path}: {what} must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
  if images.dtype == np.uint8:
    return images
  if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
    raise DataError(f"{path}: {what} must be uint8 or real numbers, got {images.dtype}")
  images = images.astype(np.float32)
  if not np.all(np.isfinite(images)):
    raise DataError(f"{path}: {what} holds NaN or infinity")
  return images


def _pair(images, labels, path, what, classes=None):
  images, labels = _images(images, path, f"{what} images"), _labels(labels, path, f"{what} labels", classes)
  if len(images) != len(labels):
    raise DataError(f"{path}: {len(images)} {what} images but {len(labels)} labels")
  if not len(images):
    raise DataError(f"{path}: no {what} images")
  return images, labels


def _find(root: str, names) -> str | None:
  """The path of ``names[0]`` (or its ``.gz``) under ``root`` or a known CIFAR subfolder; None if absent."""
  for d in (root,) + tuple(os.path.join(root, s) for s in _CIFAR_SUBDIRS):
    for suffix in ("", ".gz"):
      p = os.path.join(d, names + suffix)
      if os.path.isfile(p):
        return p
  return None


def detect_format(source: str) -> str:
  """The format of ``source`` (module docstring); a one-line DataError when none fits."""
  if source == DIGITS:
    return "digits"
  path = os.path.abspath(os.path.expanduser(source))
  if not os.path.exists(path):
    raise DataError(f"data {source!r} does not exist")
  if os.path.isfile(path):
    if path.endswith(".npz"):
      return "npz"
    raise DataError(f"data {source!r}: a file must be an .npz; name the directory of IDX or CIFAR files")
  if _find(path, _IDX_FILES["train"][0]):
    return "idx"
  if _find(path, _CIFAR10[0][0]):
    return "cifar10"
  if _find(path, _CIFAR100[0][0]):
    return "cifar100"
  raise DataError(f"data {source!r}: no MNIST IDX files ({_IDX_FILES['train'][0]}), CIFAR-10 "
                  f"({_CIFAR10[0][0]}) or CIFAR-100 ({_CIFAR100[0][0]}) binary files found")


def _files(source: str, fmt: str) -> list[tuple[str, str]]:
  """``(split, path)`` of every file the format reads."""
  root = os.path.abspath(os.path.expanduser(source))
  if fmt == "npz":
    return [("both", root)]
  groups = {"idx": [("train", n) for n in _IDX_FILES["train"]] + [("test", n) for n in _IDX_FILES["test"]],
            "cifar10": [("train", n) for n in _CIFAR10[0]] + [("test", n) for n in _CIFAR10[1]],
            "cifar100": [("train", n) for n in _CIFAR100[0]] + [("test", n) for n in _CIFAR100[1]]}[fmt]
  out = []
  for split, name in groups:
    p = _find(root, name)
    if p is None:
      raise DataError(f"data {source!r} ({fmt}): missing {name}")
    out.append((split, p))
  return out


def _read(source: str, fmt: str, classes: int = 0):
  """``(files, train_images, train_labels, test_images | None, test_labels | None, classes | None)``;
  ``classes`` > 0 bounds the labels instead of the format's own count."""
  if fmt == "digits":
    try:
      from sklearn import datasets as sk_datasets
    except ImportError:
      raise DataError("data 'digits' needs scikit-learn (pip install -e '.[vision]')") from None
    d = sk_datasets.load_digits()
    return ([], np.asarray(d.images, np.uint8)[..., None], np.asarray(d.target, np.int32), None, None,
            classes or 10)
  files = _files(source, fmt)
  if fmt == "npz":
    path = files[0][1]
    z = read_npz(path)
    for k in ("images", "labels"):
      if k not in z:
        raise DataError(f"{path}: no array {k!r} (it holds {sorted(z) or 'nothing'})")
    if ("test_images" in z) != ("test_labels" in z):
      raise DataError(f"{path}: test_images and test_labels go together")
    tr = _pair(z["images"], z["labels"], path, "training", classes or None)
    te = (_pair(z["test_images"], z["test_labels"], path, "test", classes or None) if "test_images" in z
          else (None, None))
    if te[0] is not None and te[0].shape[1:] != tr[0].shape[1:]:
      raise DataError(f"{path}: test images {te[0].shape[1:]} differ from training images {tr[0].shape[1:]}")
    return [files[0][1]], tr[0], tr[1], te[0], te[1], classes or None
  if fmt == "idx":
    (_, tri), (_, trl), (_, tei), (_, tel) = files
    classes = classes or 10  # MNIST and Fashion-MNIST
    tr = _pair(read_idx(tri), read_idx(trl), trl, "training", classes)
    te = _pair(read_idx(tei), read_idx(tel), tel, "test", classes)
    if te[0].shape[1:] != tr[0].shape[1:]:
      raise DataError(f"{tei}: test images {te[0].shape[1:]} differ from training images {tr[0].shape[1:]}")
    return [p for _, p in files], tr[0], tr[1], te[0], te[1], classes
  label_bytes, classes = (1, classes or 10) if fmt == "cifar10" else (2, classes or 100)
  parts = {"train": [], "test": []}
  for split, p in files:
    images, labels = read_cifar(p, label_bytes)
    parts[split].append(_pair(images, labels, p, split, classes))
  cat = lambda split, i: np.concatenate([x[i] for x in parts[split]])
  return [p for _, p in files], cat("train", 0), cat("train", 1), cat("test", 0), cat("test", 1), classes


def _subset(n: int, cap: int, seed: int, salt: int) -> np.ndarray:
  if cap <= 0 or cap >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng([seed, salt]).permutation(n)[:cap])


@functools.lru_cache(maxsize=4)
def load(source: str, fmt: str = "auto", test_frac: float = 0.2, split_seed: int = 0, max_train: int = 0,
         max_test: int = 0, classes: int = 0) -> Dataset:
  """Reads ``source`` (module docstring) and splits it; a one-line DataError if it cannot be used.

  ``classes`` > 0: the number of classes (labels must lie below it); 0: the format's (10 for digits, IDX
  and CIFAR-10, 100 for CIFAR-100, the largest label + 1 for an ``.npz``)."""
  if fmt not in FORMATS:
    raise DataError(f"format must be one of {FORMATS}, got {fmt!r}")
  detected = detect_format(source)
  if fmt == "auto":
    fmt = detected
  elif fmt != detected and not (fmt in ("cifar10", "cifar100") and detected in ("cifar10", "cifar100")):
    raise DataError(f"data {source!r} holds {detected} files, not {fmt}")
  files, tr_x, tr_y, te_x, te_y, classes = _read(source, fmt, classes)
  if te_x is None:  # split by a seeded permutation
    if not 0 < test_frac < 1:
      raise DataError(f"test_frac must lie in (0, 1) for data without a test split, got {test_frac}")
    order = np.random.default_rng([split_seed, 0x5EED]).permutation(len(tr_x))
    n_test = int(round(test_frac * len(tr_x)))
    if n_test < 1 or n_test >= len(tr_x):
      raise DataError(f"data {source!r}: test_frac={test_frac} of {len(tr_x)} images leaves an empty split")
    te_x, te_y = tr_x[np.sort(order[:n_test])], tr_y[np.sort(order[:n_test])]
    tr_x, tr_y = tr_x[np.sort(order[n_test:])], tr_y[np.sort(order[n_test:])]
  if classes is None:
    classes = int(max(tr_y.max(), te_y.max())) + 1
  if classes < 2:
    raise DataError(f"data {source!r}: one class only")
  keep_tr, keep_te = _subset(len(tr_x), max_train, split_seed, 1), _subset(len(te_x), max_test, split_seed, 2)
  digest = hashlib.sha256(f"vision\n{fmt}\ntest_frac={test_frac}\nsplit_seed={split_seed}\n"
                          f"max_train={max_train}\nmax_test={max_test}\nclasses={classes}\n".encode())
  root = os.path.abspath(os.path.expanduser(source)) if source != DIGITS else ""
  rel = []
  if files:
    for p in files:
      name = os.path.relpath(p, root) if os.path.isdir(root) else os.path.basename(p)
      rel.append(name.replace(os.sep, "/"))
      with open(p, "rb") as f:
        digest.update(f"{rel[-1]}\t{os.path.getsize(p)}\t{hashlib.sha256(f.read()).hexdigest()}\n".encode())
  else:  # built in: the arrays themselves
    for a in (tr_x, tr_y, te_x, te_y):
      digest.update(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest().encode())
  return Dataset(name=source, format=fmt, files=tuple(rel),
                 train_images=np.ascontiguousarray(tr_x[keep_tr]), train_labels=tr_y[keep_tr],
                 test_images=np.ascontiguousarray(te_x[keep_te]), test_labels=te_y[keep_te], classes=classes,
                 fingerprint=digest.hexdigest()[:16])


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) as an IDX file (for tests and for converting data; gzip when ``.gz``)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  data = header + array.tobytes()
  buf = gzip.compress(data) if path.endswith(".gz") else data
  with open(path, "wb") as f:
    f.write(buf)


def write_cifar(path: str, images_Tx32x32x3: np.ndarray, labels_T: np.ndarray, coarse_T=None) -> None:
  """Writes CIFAR binary records (CIFAR-100's when ``coarse_T`` is given)."""
  planes = np.asarray(images_Tx32x32x3, np.uint8).transpose(0, 3, 1, 2)
  images = np.ascontiguousarray(planes).reshape(-1, 3072)
  cols = ([np.asarray(coarse_T, np.uint8)[:, None]] if coarse_T is not None else [])
  rec = np.concatenate(cols + [np.asarray(labels_T, np.uint8)[:, None], images], axis=1)
  with io.open(path, "wb") as f:
    f.write(rec.tobytes())
