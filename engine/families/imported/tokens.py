"""Token corpora for imported models: ids on disk, memory-mapped, or text tokenized by a local tokenizer.

``open_tokens(path, vocab, ...)`` reads, by the path's form:

* ``*.bin``: raw token ids, ``uint16`` or ``uint32`` (``dtype``; "auto": uint16 when the vocabulary has at
  most 65,536 entries, as nanoGPT and the Pile test set keep them), memory-mapped, never read whole;
* ``*.npy``: a NumPy array of integer ids (any shape, read in order), memory-mapped with
  ``allow_pickle=False``;
* anything else: text, a file or a directory of files (hidden files skipped, taken in the order of their
  relative paths), encoded by a Hugging Face ``tokenizer.json`` with the ``tokenizers`` library, offline,
  until ``max_tokens`` ids are read.

Every id must lie below the model's vocabulary; an empty corpus, a file that is not a whole number of ids of
its dtype, a non-integer array or an out-of-vocabulary id is refused in one line (``TokensError``). The
fingerprint hashes the ids read, so the same ids from a ``.bin`` and from text give the same one.

``drop_ids`` names the ids left out of the statistics (the ``analysis.drop`` setting): BOS / EOS / pad as
the model's config names them, and every token whose text holds a newline (from the tokenizer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

_CHUNK = 1 << 22  # ids per chunk of the vocabulary check and the fingerprint
DROP_KINDS = ("bos", "pad", "newline")


class TokensError(ValueError):
  """A token corpus that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Tokens:
  """Token ids of a corpus (``ids``: 1-D integers, memory-mapped for ``.bin`` and ``.npy``)."""
  path: str
  kind: str
  ids: np.ndarray
  fingerprint: str


def _files(root: str) -> list[str]:
  if os.path.isfile(root):
    return [root]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
    out += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
  return sorted(out, key=lambda p: os.path.relpath(p, root))


def load_tokenizer(path: str):
  """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (one-line TokensError otherwise)."""
  try:
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TokensError("reading text needs the tokenizers package: pip install tokenizers") from None
  if not os.path.isfile(path):
    raise TokensError(f"tokenizer {path!r} does not exist")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises its own exception type for a malformed file
    raise TokensError(f"tokenizer {path!r} does not load: {str(e).splitlines()[0][:120]}") from None


def _encode(root: str, tokenizer: str, max_tokens: int) -> np.ndarray:
  if not tokenizer:
    raise TokensError(f"corpus {root!r} is text: name its tokenizer.json (analysis.tokenizer) or give token "
                      "ids (.bin, .npy)")
  tok = load_tokenizer(tokenizer)
  parts, n = [], 0
  for file in _files(root):
    try:
      with open(file, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise TokensError(f"corpus file {file} is not readable UTF-8 text ({type(e).__name__})") from None
    if not text:
      continue
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int64)
    parts.append(ids)
    n += len(ids)
    if max_tokens and n >= max_tokens:
      break
  return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def _check_ids(ids: np.ndarray, vocab: int, where: str) -> str:
  """Refuses out-of-vocabulary ids (one line naming the first); returns the fingerprint of the ids."""
  digest = hashlib.sha256(f"ids\n{len(ids)}\n".encode())
  for a in range(0, len(ids), _CHUNK):
    chunk = np.asarray(ids[a:a + _CHUNK]).astype(np.int64)
    bad = np.flatnonzero((chunk < 0) | (chunk >= vocab))
    if bad.size:
      i = int(bad[0])
      raise TokensError(f"{where}: token id {int(chunk[i])} at position {a + i:,} is outside the model's "
                        f"vocabulary of {vocab:,} (another tokenizer, or the wrong dtype?)")
    digest.update(chunk.astype("<u4").tobytes())
  return digest.hexdigest()[:16]


def open_tokens(path: str, vocab: int, tokenizer: str = "", dtype: str = "auto",
                max_tokens: int = 0) -> Tokens:
  """The token corpus at ``path`` (module docstring), at most ``max_tokens`` ids (0: all)."""
  if not path:
    raise TokensError("no token corpus: set analysis.corpus (--corpus) to a .bin, a .npy or text")
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(full):
    raise TokensError(f"corpus {path!r} does not exist")
  if os.path.isfile(full) and full.endswith(".bin"):
    dtype = ("uint16" if vocab <= 1 << 16 else "uint32") if dtype == "auto" else dtype
    if dtype not in ("uint16", "uint32"):
      raise TokensError(f"corpus {path!r}: dtype must be uint16 or uint32 for a .bin, got {dtype!r}")
    size, item = os.path.getsize(full), np.dtype(dtype).itemsize
    if size == 0:
      raise TokensError(f"corpus {path!r} is empty")
    if size % item:
      raise TokensError(f"corpus {path!r} ({size:,} bytes) is not a whole number of {dtype} ids: wrong "
                        "dtype?")
    ids, kind = np.memmap(full, dtype=np.dtype(dtype).newbyteorder("<"), mode="r"), "bin"
  elif os.path.isfile(full) and full.endswith(".npy"):
    try:
      ids = np.load(full, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
      reason = str(e).splitlines()[0][:80]
      raise TokensError(f"corpus {path!r} is not a plain .npy array ({reason})") from None
    except OSError as e:
      raise TokensError(f"corpus {path!r} does not read as .npy ({e})") from None
    if ids.dtype.kind not in "ui":
      raise TokensError(f"corpus {path!r} holds {ids.dtype} values: token ids must be integers (wrong dtype)")
    ids, kind = ids.reshape(-1), "npy"
  else:
    ids, kind = _encode(full, tokenizer, max_tokens), "text"
  if max_tokens:
    ids = ids[:max_tokens]
  if len(ids) == 0:
    raise TokensError(f"corpus {path!r} is empty")
  return Tokens(path=full, kind=kind, ids=ids, fingerprint=_check_ids(ids, vocab, path))


def newline_ids(tokenizer: str, vocab: int) -> np.ndarray:
  """Ids (below ``vocab``) of the tokens whose text holds a newline, from a local tokenizer.json."""
  tok = load_tokenizer(tokenizer)
  size = min(int(tok.get_vocab_size(with_added_tokens=True)), vocab)
  return np.asarray([i for i in range(size) if "\n" in tok.decode([i], skip_special_tokens=False)], np.int64)


def letter_classes(tokenizer: str, vocab: int) -> np.ndarray:
  """int32 ``[vocab]``: the first letter of each token's text, spaces skipped and case folded (0..25 for
  a..z), 26 for a token that starts with anything else (the partition of Gurnee et al.'s alphabet neurons)."""
  tok = load_tokenizer(tokenizer)
  size = min(int(tok.get_vocab_size(with_added_tokens=True)), vocab)
  out = np.full(vocab, 26, np.int32)
  for i in range(size):
    text = tok.decode([i], skip_special_tokens=False).lstrip().lower()
    if text and "a" <= text[0] <= "z":
      out[i] = ord(text[0]) - ord("a")
  return out


def drop_ids(drop: str, special_ids, tokenizer: str, vocab: int) -> tuple[np.ndarray, list[str]]:
  """``(ids to leave out of the statistics, notes)`` for the ``drop`` setting ("bos,pad,newline", "" for
  none); a note says what could not be dropped (newline tokens without a tokenizer)."""
  kinds = [k.strip() for k in str(drop).split(",") if k.strip()]
  bad = [k for k in kinds if k not in DROP_KINDS]
  if bad:
    raise TokensError(f"analysis.drop: {bad[0]!r} is not one of {', '.join(DROP_KINDS)}")
  out, notes = [], []
  if "bos" in kinds or "pad" in kinds:
    out += [int(i) for i in special_ids if 0 <= int(i) < vocab]
  if "newline" in kinds:
    if tokenizer:
      out += newline_ids(tokenizer, vocab).tolist()
    else:
      notes.append("newline tokens kept: no tokenizer.json to find them")
  return np.unique(np.asarray(out, np.int64)), notes
