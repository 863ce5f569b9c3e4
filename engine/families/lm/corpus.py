"""The byte corpus of a language-model study: which files, in which order, split by file, fingerprinted.

``"stdlib"`` (the default) is the Python source of the running interpreter's standard library: every ``.py``
file below ``sysconfig.get_paths()["stdlib"]`` except installed packages (``site-packages``,
``dist-packages``) and caches, in the order of their POSIX paths relative to that directory. Any other value
is a path: a text file, or a directory whose regular files (hidden ones and caches skipped) are taken in the
same order. Nothing is downloaded.

A file is held out when a hash of its relative path falls below ``heldout_frac``, so adding or removing one
file never moves another across the split. A corpus of one file is split by position instead: its last
``heldout_frac`` of bytes are held out. The fingerprint (a hash of every file's relative path, byte
count and contents, and the cap) is written into the study's config, so a relaunch or a replay on a machine
whose corpus differs is refused instead of silently training or analysing on other text. A file holding a
NUL byte is binary, not text, and is refused.

Bytes are the vocabulary (256 symbols); files are concatenated as they are. The text is held once: a
one-file corpus is memory-mapped (read-only; the training and held-out text are views of the map), a
directory's files are read block by block straight into one training and one held-out array
(``held_in_memory``; the LM family's size estimate counts the same).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import sysconfig

import numpy as np

STDLIB = "stdlib"
VOCAB = 256
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


class CorpusError(ValueError):
  """A corpus that cannot be used (missing, empty, unreadable, too small); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The bytes of a corpus, split into training and held-out text.

  Attributes:
    name: ``"stdlib"`` or the path given.
    root: the directory (or file) the files were read from.
    files: relative paths, in corpus order.
    sizes: bytes of each file (after the cap).
    heldout: bool per file (a one-file corpus: False, split by position instead).
    train: uint8 bytes of the training text.
    test: uint8 bytes of the held-out text.
    fingerprint: hex digest of (relative path, byte count, contents) of every file and the cap.
  """
  name: str
  root: str
  files: tuple[str, ...]
  sizes: tuple[int, ...]
  heldout: tuple[bool, ...]
  train: np.ndarray
  test: np.ndarray
  fingerprint: str
  legacy_fingerprint: str = ""  # of paths and sizes only, as run directories written before contents counted

  @property
  def n_bytes(self) -> int:
    return int(sum(self.sizes))


def _stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def list_files(name: str) -> tuple[str, tuple[str, ...]]:
  """``(root, relative paths)`` of the corpus ``name`` in corpus order; a one-line CorpusError if unusable."""
  if name == STDLIB:
    root, suffix = _stdlib_root(), ".py"
  else:
    root, suffix = os.path.abspath(os.path.expanduser(name)), ""
    if not os.path.exists(root):
      raise CorpusError(f"corpus {name!r} does not exist")
    if os.path.isfile(root):
      if not os.access(root, os.R_OK):
        raise CorpusError(f"corpus {name!r} is not readable")
      return root, (os.path.basename(root),)
    if not os.path.isdir(root):
      raise CorpusError(f"corpus {name!r} is neither a file nor a directory")
  if not os.path.isdir(root):
    raise CorpusError(f"the standard library directory {root!r} does not exist")
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
    for f in filenames:
      full = os.path.join(dirpath, f)
      if f.startswith(".") or not f.endswith(suffix) or not os.path.isfile(full):
        continue
      out.append(os.path.relpath(full, root).replace(os.sep, "/"))
  if not out:
    raise CorpusError(f"corpus {name!r} has no files" + (f" ending in {suffix}" if suffix else ""))
  return root, tuple(sorted(out))


def size_on_disk(name: str, max_bytes: int = 0) -> int:
  """The bytes ``load`` would read (after the cap), from the files' sizes alone: nothing is read, so a size
  check can refuse a corpus too large for memory before it is loaded."""
  root, files = list_files(name)
  if os.path.isfile(root):
    total = os.path.getsize(root)
  else:
    total = sum(os.path.getsize(os.path.join(root, rel)) for rel in files)
  return min(total, max_bytes) if max_bytes > 0 else total


def is_mapped(name: str) -> bool:
  """Whether ``load`` memory-maps the corpus ``name`` (a one-file corpus) rather than reading it in."""
  return name != STDLIB and os.path.isfile(os.path.abspath(os.path.expanduser(name)))


def _is_heldout(rel: str, heldout_frac: float) -> bool:
  h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
  return h / 2.0 ** 64 < heldout_frac


_BLOCK = 16 << 20  # bytes read, checked and hashed at a time (a directory's files)


def _single_file(full: str, n: int) -> tuple[np.ndarray, str]:
  """The first ``n`` bytes of the file ``full`` as a read-only memory map (uint8) and their sha256.

  The kernel pages the text in from the file as it is read and may drop it again: nothing of it is held in
  the process's own memory, so a corpus larger than RAM costs only the device's copy (on the CPU not even
  that: JAX reads the map in place). The map stays valid while an array refers to it. The file is read,
  not copied, for as long as the launch runs: it must not be edited meanwhile (a relaunch refuses an edited
  corpus by its fingerprint; a file truncated while mapped ends the process with SIGBUS, as any
  memory-mapped input would).
  """
  try:
    with open(full, "rb") as f:
      mapped = mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ)
  except (OSError, ValueError) as e:  # ValueError: the file shrank below n since it was sized
    raise CorpusError(f"cannot map corpus file {full}: {getattr(e, 'strerror', None) or e}") from None
  nul = mapped.find(b"\0", 0, n)
  if nul >= 0:  # text never holds a NUL byte; images, archives and compiled files do
    raise CorpusError(f"corpus file {full} is binary (a NUL byte at offset {nul}), not text: remove it from "
                      "the corpus or name a text file")
  text = np.frombuffer(mapped, np.uint8, count=n)
  return text, hashlib.sha256(memoryview(text)).hexdigest()


def _read_into(full: str, out: np.ndarray) -> str:
  """Reads the file ``full`` into ``out`` (its exact length) by blocks, refusing NUL bytes; its sha256."""
  digest, pos = hashlib.sha256(), 0
  try:
    with open(full, "rb") as f:
      while pos < len(out):
        block = f.read(min(_BLOCK, len(out) - pos))
        if not block:
          raise CorpusError(f"corpus file {full} shrank while it was read ({pos:,} of {len(out):,} bytes)")
        nul = block.find(b"\0")
        if nul >= 0:  # text never holds a NUL byte; images, archives and compiled files do
          raise CorpusError(f"corpus file {full} is binary (a NUL byte at offset {pos + nul}), not text: "
                            "remove it from the corpus or name a text file")
        digest.update(block)
        out[pos:pos + len(block)] = np.frombuffer(block, np.uint8)
        pos += len(block)
  except OSError as e:
    raise CorpusError(f"cannot read corpus file {full}: {e.strerror}") from None
  return digest.hexdigest()


def load(name: str, heldout_frac: float, max_bytes: int = 0, min_bytes: int = 2) -> Corpus:
  """Reads the corpus ``name`` (see the module docstring), at most ``max_bytes`` bytes (0: all).

  The text is held once: a one-file corpus as a read-only memory map of the file (its training and held-out
  text are views of it), a directory's files read block by block into one training and one held-out array.
  ``min_bytes`` is the least each split must hold (e.g. a context window plus one byte).
  """
  if not 0 < heldout_frac < 1:
    raise CorpusError(f"heldout_frac must lie in (0, 1), got {heldout_frac}")
  root, files = list_files(name)
  single = os.path.isfile(root)
  sizes, kept = [], []
  budget = max_bytes if max_bytes > 0 else None
  for rel in files:  # sized first, so that the text is read once, into arrays of its final size
    full = root if single else os.path.join(root, rel)
    try:
      size = os.path.getsize(full)
    except OSError as e:
      raise CorpusError(f"cannot read corpus file {full}: {e.strerror}") from None
    size = size if budget is None else min(size, budget)
    if not size:
      continue
    sizes.append(size)
    kept.append(rel)
    if budget is not None:
      budget -= size
      if budget <= 0:
        break
  if not kept:
    raise CorpusError(f"corpus {name!r} is empty")
  if single:
    text, file_digest = _single_file(root, sizes[0])
    digests = [file_digest]
    cut = len(text) - int(round(heldout_frac * len(text)))
    train, test, heldout = text[:cut], text[cut:], (False,)
  else:
    heldout = tuple(_is_heldout(rel, heldout_frac) for rel in kept)
    if all(heldout) or not any(heldout):  # too few files for the hash to split: hold out the last one
      heldout = (False,) * (len(kept) - 1) + (True,)
    train = np.empty((sum(n for n, h in zip(sizes, heldout) if not h),), np.uint8)
    test = np.empty((sum(n for n, h in zip(sizes, heldout) if h),), np.uint8)
    at, digests = {False: 0, True: 0}, []
    for rel, size, held in zip(kept, sizes, heldout):  # each file once, in corpus order, into its split
      part = test if held else train
      digests.append(_read_into(os.path.join(root, rel), part[at[held]:at[held] + size]))
      at[held] += size
  for what, part in (("training", train), ("held-out", test)):
    if len(part) < min_bytes:
      raise CorpusError(f"corpus {name!r} has {len(part)} {what} bytes; need at least {min_bytes} "
                        "(a context window and its next byte)")
  legacy = hashlib.sha256(f"cap={max_bytes}\n".encode())
  for rel, size in zip(kept, sizes):
    legacy.update(f"{rel}\t{size}\n".encode())
  digest = hashlib.sha256(f"contents\ncap={max_bytes}\n".encode())
  # The bytes too: an edit that keeps a size is another text.
  for rel, size, file_digest in zip(kept, sizes, digests):
    digest.update(f"{rel}\t{size}\t{file_digest}\n".encode())
  return Corpus(name=name, root=root, files=tuple(kept), sizes=tuple(sizes), heldout=tuple(heldout),
                train=train, test=test, fingerprint=digest.hexdigest()[:16],
                legacy_fingerprint=legacy.hexdigest()[:16])


def held_in_memory(c: Corpus) -> int:
  """Bytes of the corpus's text held in the process's own memory: 0 for a memory-mapped file (the kernel's
  page cache holds it, and may drop it), else the training and held-out arrays."""
  base = c.train
  while isinstance(base, np.ndarray) and base.base is not None:
    base = base.base
  base = base.obj if isinstance(base, memoryview) else base
  return 0 if isinstance(base, mmap.mmap) else int(c.train.nbytes + c.test.nbytes)


def _counts(text: np.ndarray) -> np.ndarray:
  """float64 ``[VOCAB]``: how often each byte occurs in ``text``, counted by blocks of 1 MiB (``np.bincount``
  of the whole text would first widen it to 8 bytes per byte)."""
  counts = np.zeros((VOCAB,), np.int64)
  for i in range(0, len(text), 1 << 20):
    counts += np.bincount(text[i:i + (1 << 20)], minlength=VOCAB)
  return counts.astype(np.float64)


def unigram_bits(train: np.ndarray, test: np.ndarray) -> tuple[float, float]:
  """``(entropy, cross-entropy)`` in bits per byte of the training text's byte distribution: its entropy on
  the training text, and the cost of coding the held-out text with it (add-one smoothed)."""
  counts = _counts(train) + 1.0
  p = counts / counts.sum()
  entropy = float(-(p * np.log2(p)).sum())
  cross = float(-(_counts(test) * np.log2(p)).sum() / len(test))
  return entropy, cross
