"""A local GCS JSON API server for tests: gcp-storage-emulator on 127.0.0.1, plus what it lacks.

The emulator ignores write preconditions, has no permissions and sends no generation header. Three small
additions at its handler level make the tests mean something:

  - ``ifGenerationMatch`` on object uploads (media, multipart, resumable) and deletes: 412 when the object's
    generation differs (0: the object must not exist), as GCS answers. The workdir lease depends on it.
  - read-only buckets (``Server.read_only``): every write to them answers 403, as GCS does for credentials
    without ``storage.objects.create``; reads still work.
  - the ``x-goog-generation`` header on object downloads, as GCS sends it: TensorStore (Orbax's array
    writer) reads an OCDBT manifest's generation from it and makes its next write of the manifest
    conditional on it.

Run one in-process with ``start()``; its URL goes into ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import logging
import socket
import threading
from http import HTTPStatus

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import NotFound

_WRITES = ("POST", "PUT", "DELETE", "PATCH")
_read_only: set[str] = set()
_patched = threading.Lock()


def _error(response, status: HTTPStatus, reason: str, message: str) -> None:
  response.status = status
  response.json({"error": {"code": status.value, "message": message,
                           "errors": [{"domain": "global", "reason": reason, "message": message}]}})


def _object_name(request) -> str | None:
  if request.params and request.params.get("object_id"):
    return request.params["object_id"]
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict):
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
    return meta.get("name")
  return None


_READ_OK = (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT)


def _add_generation(request, response, storage, bucket) -> None:
  """The ``x-goog-generation`` header GCS sends with an object's bytes: TensorStore takes the generation of
  what it read from it (the emulator omits it, and a later conditional write of that object then fails)."""
  try:
    obj = storage.get_file_obj(bucket, (request.params or {}).get("object_id"))
  except NotFound:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def _guarded(handler):
  def wrapped(request, response, storage, *args, **kwargs):
    bucket = (request.params or {}).get("bucket_name")
    if request.method in _WRITES and bucket in _read_only:
      return _error(response, HTTPStatus.FORBIDDEN, "forbidden",
                    f"caller does not have storage.objects.create access to the Google Cloud Storage bucket "
                    f"{bucket}.")
    wanted = request.query.get("ifGenerationMatch")
    if wanted and request.method in ("POST", "DELETE") and "upload_id" not in request.query:
      name = _object_name(request)
      try:
        current = str(storage.get_file_obj(bucket, name)["generation"])
      except NotFound:
        current = "0"
      if current != wanted[0]:
        return _error(response, HTTPStatus.PRECONDITION_FAILED, "conditionNotMet",
                      "At least one of the pre-conditions you specified did not hold.")
    out = handler(request, response, storage, *args, **kwargs)
    if request.method == "GET" and request.query.get("alt") == ["media"] and response.status in _READ_OK:
      _add_generation(request, response, storage, bucket)
    return out
  wrapped.guarded = True
  return wrapped


def _patch_handlers() -> None:
  with _patched:
    for _, methods in emulator.HANDLERS:
      for method, handler in list(methods.items()):
        if not getattr(handler, "guarded", False):
          methods[method] = _guarded(handler)
    if not getattr(emulator.objects.insert, "guarded", False):
      emulator.objects.insert = _guarded(emulator.objects.insert)  # the router's fallback for uploads
    emulator.APIThread.run = _run


class _HTTPServer(emulator.server.HTTPServer):
  request_queue_size = 128  # TensorStore opens many connections at once

  def handle_error(self, request, client_address):  # a client that hung up (a killed launch): not news
    pass


def _run(self):
  self._httpd = _HTTPServer((self._host, self._port), emulator.partial(emulator.RequestHandler, self._storage))
  self.is_running.set()
  self._httpd.serve_forever()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """A running server: ``url`` (for STORAGE_EMULATOR_HOST), ``read_only`` (bucket names), ``stop()``."""

  def __init__(self, buckets=("bucket",)):
    _patch_handlers()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = emulator.create_server("127.0.0.1", self.port, in_memory=True)
    for b in buckets:
      emulator.buckets.create_bucket(b, self._server._storage)
    self.read_only = _read_only
    self._server.start()

  def stop(self) -> None:
    self._server.stop()
    _read_only.clear()


def start(buckets=("bucket",)) -> Server:
  return Server(buckets)

