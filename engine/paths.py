"""Paths of run directories: local folders and ``gs://bucket/prefix`` URLs, through one set of functions.

Every file the engine reads or writes in a run directory goes through this module (Orbax, which speaks
``etils.epath`` itself, gets the same path strings). A path is a plain string: an absolute local path, or a
``gs://`` URL kept as written (``resolve``). Any other ``scheme://`` is refused with a one-line
``RunDirError``. Local paths use ``os`` as before; ``gs://`` uses gcsfs (the fsspec filesystem that
``epath`` itself uses for ``gs://`` without TensorFlow) with its listing cache off, so a listing always sees
the objects other writers (TensorStore, another process) made. Both are imported only for a ``gs://`` path:
the engine runs on local paths without them.

How the operations map onto an object store (which has objects, not files and folders):

  write_atomic   local: a temporary file beside it, fsync, rename; gs://: one upload (an object appears whole
                 or not at all)
  append         local: ``open(..., "a")``; gs://: objects cannot be appended to, so the new bytes are
                 uploaded as ``<name>.append-<token>`` and composed server-side onto the object (GCS
                 ``compose``: the result is the concatenation and replaces the object atomically; nothing is
                 re-uploaded), then the piece is deleted. A piece left by a kill between the two is harmless
                 (``<name>.append-*`` is never read) and is removed by the next ``remove_pieces``. An
                 object composed ``MAX_COMPONENTS`` times is rewritten whole once (downloaded and uploaded),
                 which keeps it below any limit GCS sets on a composite object's component count.
  makedirs       gs://: nothing (a "folder" is a prefix of object names)
  move           local: ``os.replace`` (atomic); gs://: copy then delete, object by object (not atomic: a
                 kill in the middle leaves part at each place; used only to set a damaged metrics log or a
                 corrupt checkpoint aside, which a later launch finds corrupt again and moves on)
  generation     local: st_mtime_ns; gs://: the object's generation (changes at every write)

The environment variable ``STORAGE_EMULATOR_HOST`` (honoured by gcsfs and google-cloud-storage) points every
``gs://`` client at a local GCS server; TensorStore, which writes Orbax's arrays, has its own variable
``TENSORSTORE_GCS_HTTP_URL``, which is set from it here when unset, so one variable moves all three.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import posixpath
import re
import socket
import stat
import tempfile
import threading
import time
import uuid
import zipfile
from typing import Iterator, Mapping

import numpy as np

GCS = "gs://"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MISSING_GCS = "a gs:// workdir needs gcsfs and google-cloud-storage: pip install -e '.[gcs]'"


class RunDirError(RuntimeError):
  """A run directory that cannot be read or written as asked; the message is one line."""


def is_remote(p: str | os.PathLike) -> bool:
  return os.fspath(p).startswith(GCS)


def resolve(workdir: str | os.PathLike) -> str:
  """The canonical string of a workdir: an absolute local path, or ``gs://bucket/prefix`` (no trailing
  slash). Another URL scheme, a ``gs://`` URL without a bucket, or ``gs://`` without its packages is refused
  in one line."""
  text = os.fspath(workdir)
  m = _SCHEME.match(text)
  if m is None:
    return os.path.abspath(text)
  if m.group(1) != "gs":
    raise RunDirError(f"unsupported workdir scheme {m.group(1)}:// in {text!r}: use a local path or "
                      "gs://bucket/prefix")
  bucket, _, prefix = text[len(GCS):].partition("/")
  if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):
    raise RunDirError(f"{text!r} names no valid bucket: use gs://bucket/prefix")
  _gcsfs()  # the packages must be there before anything is done
  parts = [p for p in prefix.split("/") if p not in ("", ".")]
  if ".." in parts:
    raise RunDirError(f"{text!r}: '..' has no meaning in an object name")
  return GCS + "/".join([bucket] + parts)


def join(p: str, *names: str) -> str:
  return posixpath.join(p, *names) if is_remote(p) else os.path.join(p, *names)


def split_gcs(p: str) -> tuple[str, str]:
  """``gs://bucket/a/b`` as ``("bucket", "a/b")``."""
  bucket, _, name = p[len(GCS):].partition("/")
  return bucket, name


# ---------------------------------------------------------------------------------------------------
# The clients (gs:// only), imported on first use.

_lock = threading.Lock()
_clients: dict[str, object] = {}


def _emulator_setup() -> None:
  """Points TensorStore at ``STORAGE_EMULATOR_HOST`` too, and keeps gcsfs off the storage-control API (which
  an emulator does not serve) when it is set."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _has_credentials() -> bool:
  """Whether Google's client libraries can find credentials without waiting: an emulator, a key file, the
  application default credentials of gcloud, or a Google Compute Engine / GKE machine (its metadata server).
  Without any of them the libraries probe the metadata server for many seconds and then raise."""
  env = os.environ
  if env.get("STORAGE_EMULATOR_HOST") or env.get("GOOGLE_APPLICATION_CREDENTIALS"):
    return True
  if env.get("GCE_METADATA_HOST") or env.get("GCE_METADATA_IP"):
    return True
  sdk_dir = env.get("CLOUDSDK_CONFIG") or (os.path.join(env.get("APPDATA", ""), "gcloud") if os.name == "nt"
                                           else os.path.join(os.path.expanduser("~"), ".config", "gcloud"))
  if os.path.isfile(os.path.join(sdk_dir, "application_default_credentials.json")):
    return True
  try:
    with open("/sys/class/dmi/id/product_name") as f:  # how google.auth itself recognises a GCE machine
      return f.read().strip().startswith("Google")
  except OSError:
    return False


_NO_CREDENTIALS = ("gs:// needs Google Cloud credentials and none were found: run `gcloud auth "
                   "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a key file, run on a Google "
                   "Cloud machine, or set STORAGE_EMULATOR_HOST for an emulator")


def _gcsfs():
  """The gcsfs filesystem of this process, listing cache off; a one-line error when gcsfs is absent."""
  with _lock:
    if "fs" not in _clients:
      if not _has_credentials():
        raise RunDirError(_NO_CREDENTIALS)
      _emulator_setup()
      try:
        import fsspec
        import gcsfs
        import google.cloud.storage  # noqa: F401  (the lease needs it; refuse early when it is absent)
      except ImportError:
        raise RunDirError(_MISSING_GCS) from None
      for protocol in ("gs", "gcs"):  # epath's gcsfs (Orbax's listings) must not cache listings either
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
      _clients["fs"] = gcsfs.GCSFileSystem(use_listings_cache=False, skip_instance_cache=True)
    return _clients["fs"]


def _storage_client():
  """A google-cloud-storage client (it has write preconditions, which gcsfs does not expose)."""
  _gcsfs()
  with _lock:
    if "storage" not in _clients:
      from google.cloud import storage
      _clients["storage"] = storage.Client()
    return _clients["storage"]


def reset_clients() -> None:
  """Forgets the clients, so that the next use reads the environment again (tests point it elsewhere)."""
  with _lock:
    _clients.clear()


def _fs_path(p: str) -> str:
  return p[len(GCS):]


# ---------------------------------------------------------------------------------------------------
# Files.


def exists(p: str) -> bool:
  return _gcsfs().exists(_fs_path(p)) if is_remote(p) else os.path.exists(p)


def isfile(p: str) -> bool:
  return _gcsfs().isfile(_fs_path(p)) if is_remote(p) else os.path.isfile(p)


def isdir(p: str) -> bool:
  """Local: a directory; gs://: a prefix that some object's name starts with."""
  return _gcsfs().isdir(_fs_path(p)) if is_remote(p) else os.path.isdir(p)


def makedirs(p: str) -> None:
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def read_bytes(p: str) -> bytes:
  """The file's bytes; FileNotFoundError when it does not exist."""
  if is_remote(p):
    return _gcsfs().cat_file(_fs_path(p))
  with open(p, "rb") as f:
    return f.read()


def read_text(p: str, errors: str = "strict") -> str:
  return read_bytes(p).decode("utf-8", errors=errors)


def open_read(p: str):
  """A binary file object to read in blocks (close it)."""
  return _gcsfs().open(_fs_path(p), "rb") if is_remote(p) else open(p, "rb")


def write_atomic(p: str, data: bytes | str) -> None:
  """Writes ``data`` to ``p`` so that readers see the old content or the new, never part of it."""
  if isinstance(data, str):
    data = data.encode()
  if is_remote(p):
    _gcsfs().pipe_file(_fs_path(p), data)
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p) or ".", prefix=f".{os.path.basename(p)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
    tmp = None
  except OSError as e:  # a full disk names no file by itself
    raise OSError(e.errno, e.strerror, p) from None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


APPEND_PIECE = ".append-"  # gs://: <name>.append-<token>, a piece being composed onto <name>
MAX_COMPONENTS = 1000  # gs://: a composite object of this many components is rewritten as a plain one


def append(p: str, data: bytes | str) -> None:
  """Appends ``data`` to the file ``p`` (created if absent); see the module docstring for gs://."""
  if isinstance(data, str):
    data = data.encode()
  if not is_remote(p):
    try:
      with open(p, "ab") as f:
        f.write(data)
        f.flush()
    except OSError as e:
      raise OSError(e.errno, e.strerror, p) from None
    return
  fs = _gcsfs()
  try:
    components = int(fs.info(_fs_path(p)).get("componentCount") or 1)
  except FileNotFoundError:
    components = 0
  if components == 0 or components >= MAX_COMPONENTS:  # new, or rewritten whole now and then (see above)
    fs.pipe_file(_fs_path(p), (read_bytes(p) if components else b"") + data)
    return
  piece = f"{p}{APPEND_PIECE}{uuid.uuid4().hex}"
  fs.pipe_file(_fs_path(piece), data)
  fs.merge(_fs_path(p), [_fs_path(p), _fs_path(piece)])
  fs.rm_file(_fs_path(piece))


def remove_pieces(p: str) -> None:
  """Deletes the append pieces of ``p`` that a killed writer left behind (gs://; nothing locally)."""
  if is_remote(p):
    for name in listdir(posixpath.dirname(p)):
      if name.startswith(posixpath.basename(p) + APPEND_PIECE):
        remove(join(posixpath.dirname(p), name))


def listdir(p: str) -> list[str]:
  """The names directly inside ``p`` (files and sub-folders / prefixes), sorted; [] when there are none."""
  if is_remote(p):
    try:
      entries = _gcsfs().ls(_fs_path(p), detail=False)
    except FileNotFoundError:
      return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})
  return sorted(os.listdir(p)) if os.path.isdir(p) else []


def files_under(p: str) -> list[str]:
  """The paths (relative to ``p``, with ``/``) of every file under ``p``, sorted."""
  if is_remote(p):
    root = _fs_path(p).rstrip("/") + "/"
    return sorted(f[len(root):] for f in _gcsfs().find(root) if f.startswith(root) and not f.endswith("/"))
  out = []
  for dirpath, _, names in os.walk(p):
    out += [os.path.relpath(os.path.join(dirpath, n), p).replace(os.sep, "/") for n in names]
  return sorted(out)


def irregular_files(p: str) -> list[str]:
  """Paths (relative to ``p``) under the local folder ``p`` that are not regular files or folders inside it:
  FIFOs, devices, sockets, and symbolic links (a link may lead outside the run directory or to a device).
  Such an entry is never opened: a FIFO blocks its reader forever, /dev/zero never ends. [] on gs://."""
  if is_remote(p) or not os.path.isdir(p):
    return []
  out = []
  for dirpath, dirnames, names in os.walk(p):  # os.walk follows no link to a folder
    for name in dirnames + names:
      full = os.path.join(dirpath, name)
      mode = os.lstat(full).st_mode
      if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        out.append(os.path.relpath(full, p).replace(os.sep, "/"))
  return sorted(out)


def remove(p: str) -> None:
  if is_remote(p):
    _gcsfs().rm_file(_fs_path(p))
  else:
    os.remove(p)


def move(src: str, dst: str) -> None:
  """Moves a file or folder (see the module docstring: atomic locally only)."""
  if is_remote(src):
    fs = _gcsfs()
    names = files_under(src) if fs.isdir(_fs_path(src)) else [""]
    for rel in names:  # object by object, each copied before it is deleted
      a, b = (join(src, rel), join(dst, rel)) if rel else (src, dst)
      fs.cp_file(_fs_path(a), _fs_path(b))
      fs.rm_file(_fs_path(a))
  else:
    os.replace(src, dst)


def generation(p: str) -> int:
  """A number that changes whenever ``p`` is rewritten (local: mtime in ns; gs://: the object generation)."""
  if is_remote(p):
    return int(_gcsfs().info(_fs_path(p))["generation"])
  return os.stat(p).st_mtime_ns


# ---------------------------------------------------------------------------------------------------
# Numpy archives and figures, through memory.


def write_npz(p: str, arrays: Mapping[str, np.ndarray]) -> None:
  """``arrays`` as an .npz of plain arrays (readable with ``allow_pickle=False``), written atomically."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  makedirs(posixpath.dirname(p) if is_remote(p) else os.path.dirname(p) or ".")
  write_atomic(p, buf.getvalue())


MAX_NPZ_BYTES = 2**30  # a run directory's arrays are tables of neurons: far smaller


def _npz_member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
  """``(shape, dtype, data bytes)`` of one .npy member, from its header alone; ValueError when the header is
  bad, the dtype holds objects, or the data would not fill exactly the member's uncompressed size."""
  with zf.open(info) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise ValueError(f"{info.filename}: .npy format {version} is not read")
    header = f.tell()
  if dtype.hasobject:
    raise ValueError(f"{info.filename}: dtype {dtype} holds Python objects")
  nbytes = math.prod(shape) * dtype.itemsize
  if header + nbytes != info.file_size:
    raise ValueError(f"{info.filename}: its header declares {shape} {dtype} ({nbytes} bytes) but it holds "
                     f"{info.file_size - header}")
  return shape, dtype, nbytes


def read_npz(p: str, max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
  """An .npz's arrays; nothing is unpickled (``allow_pickle=False``). Every member's header is read and its
  size checked against the archive's directory and ``max_bytes`` (all arrays together) before any array is
  allocated, so a crafted file cannot make us allocate what its header or its compression claims."""
  buf = io.BytesIO(read_bytes(p))
  try:
    with zipfile.ZipFile(buf) as zf:
      total = sum(_npz_member_header(zf, info)[2] for info in zf.infolist())
  except (zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"not an .npz archive: {e}") from None
  if total > max_bytes:
    raise ValueError(f"its arrays would take {total} bytes, more than the {max_bytes} read from one file")
  buf.seek(0)
  with np.load(buf, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def write_png(fig, p: str, save) -> None:
  """``save(fig, file_object)`` (e.g. ``universality.engine.plots.save``) rendered in memory and written atomically."""
  buf = io.BytesIO()
  save(fig, buf)
  write_atomic(p, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# Checking a gs:// workdir, and the lease that stands for flock there.

PROBE_TIMEOUT_S = 15.0  # how long a launch tries to reach the bucket before it gives up


def _gcs_error(e: Exception, url: str) -> str:
  """One line for a failed request on ``url``."""
  from google.api_core import exceptions as gexc
  bucket = split_gcs(url)[0]
  if isinstance(e, gexc.NotFound):
    return f"bucket gs://{bucket} does not exist (or is not visible to these credentials)"
  if isinstance(e, gexc.Forbidden):
    return f"no permission to write gs://{bucket} (403 Forbidden for these credentials)"
  if isinstance(e, gexc.Unauthorized):
    return f"not authorised for gs://{bucket} (401 Unauthorized: check the credentials)"
  if isinstance(e, (gexc.RetryError, ConnectionError, OSError)) or "Connection" in type(e).__name__:
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
    return (f"cannot reach the object store at {endpoint} for gs://{bucket} "
            f"(retried for {PROBE_TIMEOUT_S:g} s)")
  return f"gs://{bucket}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _retry():
  """google-cloud-storage's retry policy, bounded to ``PROBE_TIMEOUT_S`` (its default tries for minutes)."""
  from google.cloud.storage.retry import DEFAULT_RETRY
  return DEFAULT_RETRY.with_timeout(PROBE_TIMEOUT_S)


def check_writable(workdir: str) -> None:
  """Creates a local workdir, or proves that a gs:// one can be written (a probe object is written and
  deleted); a one-line RunDirError otherwise."""
  if not is_remote(workdir):
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise RunDirError(f"cannot create workdir {workdir}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise RunDirError(f"workdir {workdir} is not writable")
    return
  bucket, name = split_gcs(workdir)
  blob = _storage_client().bucket(bucket).blob(posixpath.join(name, f".write-probe-{uuid.uuid4().hex}"))
  try:
    blob.upload_from_string(b"", retry=_retry(), timeout=PROBE_TIMEOUT_S)
    blob.delete(retry=_retry(), timeout=PROBE_TIMEOUT_S)
  except Exception as e:  # the client raises many types: one line for each
    raise RunDirError(f"workdir {workdir}: {_gcs_error(e, workdir)}") from None


LEASE_TTL_S = 300.0      # a lease not refreshed for this long is stale: its holder is taken to be dead
LEASE_REFRESH_S = 30.0   # how often the holder rewrites it


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _start_time(pid: int) -> str:
  """The start time of process ``pid`` (field 22 of /proc/<pid>/stat), "" when it does not exist."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _holder() -> dict:
  return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
          "start_time": _start_time(os.getpid()), "token": uuid.uuid4().hex}


def _is_stale(record: dict, updated: float, now: float, ttl: float) -> bool:
  """A lease's holder is dead: it runs on this machine (same boot) and its process is gone, or it has not
  refreshed the lease for ``ttl`` seconds."""
  if record.get("boot_id") and record.get("boot_id") == _boot_id() and isinstance(record.get("pid"), int):
    started = _start_time(record["pid"])
    if not started or started != str(record.get("start_time")):
      return True
  return now - updated > ttl


@contextlib.contextmanager
def lease(url: str, *, ttl: float = LEASE_TTL_S, refresh: float = LEASE_REFRESH_S,
          on_lost=None) -> Iterator[None]:
  """Holds the lease object ``url`` (gs://) while the block runs; a second holder is refused in one line.

  The lease is created with ``if_generation_match=0`` (only if no object exists: GCS decides, atomically,
  for all writers) and rewritten every ``refresh`` seconds with ``if_generation_match=<its generation>``
  by a thread. An existing lease is taken over only when it is stale (``_is_stale``), again with a
  precondition on the generation seen, so of two launches taking over at once one wins. On exit it is
  deleted (only if still ours). ``on_lost()`` is called from the thread when a refresh finds the lease
  taken over (the holder was paused past ``ttl``).
  """
  from google.api_core import exceptions as gexc
  bucket, name = split_gcs(url)
  blob_of = _storage_client().bucket(bucket).blob
  me = _holder()
  body = json.dumps(me, sort_keys=True)
  blob = blob_of(name)
  try:
    try:
      blob.upload_from_string(body, if_generation_match=0, retry=_retry(), timeout=PROBE_TIMEOUT_S)
    except gexc.PreconditionFailed:
      old = blob_of(name)
      old.reload(timeout=PROBE_TIMEOUT_S)
      try:
        record = json.loads(old.download_as_bytes(if_generation_match=old.generation))
      except (ValueError, gexc.PreconditionFailed):
        record = {}
      updated = old.updated.timestamp() if old.updated else 0.0
      if isinstance(record, dict) and record.get("token") == me["token"]:  # our own create, retried
        blob = old
      elif not isinstance(record, dict) or not _is_stale(record, updated, time.time(), ttl):
        who = (f"process {record.get('pid')} on {record.get('host')}" if isinstance(record, dict)
               else "another launch")
        raise RunDirError(f"workdir {posixpath.dirname(url)} is in use by {who} (lease {url}, refreshed "
                          f"{time.time() - updated:.0f} s ago; stale after {ttl:.0f} s)")
      else:
        blob.upload_from_string(body, if_generation_match=old.generation, timeout=PROBE_TIMEOUT_S)
  except gexc.PreconditionFailed:
    raise RunDirError(f"workdir {posixpath.dirname(url)} was taken by another launch while this one "
                      f"started (lease {url})") from None
  except RunDirError:
    raise
  except Exception as e:
    raise RunDirError(f"workdir {posixpath.dirname(url)}: {_gcs_error(e, url)}") from None
  held = {"generation": blob.generation}
  stop = threading.Event()

  def keep():
    while not stop.wait(refresh):
      try:
        b = blob_of(name)
        b.upload_from_string(body, if_generation_match=held["generation"], timeout=refresh, retry=_retry())
        held["generation"] = b.generation
      except gexc.PreconditionFailed:
        held["generation"] = None
        if on_lost is not None:
          on_lost()
        return
      except Exception:  # a transient failure: the next refresh tries again, well within the ttl
        continue

  thread = threading.Thread(target=keep, name="workdir-lease", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join(timeout=refresh + PROBE_TIMEOUT_S)  # a refresh in flight is bounded by both
    if held["generation"] is not None and not thread.is_alive():
      with contextlib.suppress(Exception):
        blob_of(name).delete(if_generation_match=held["generation"], timeout=PROBE_TIMEOUT_S, retry=_retry())
