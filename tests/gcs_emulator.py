"""A local stand-in for Google Cloud Storage, for the gs:// tests: gcp-storage-emulator, in memory,
in a thread of the test process, plus the response header it leaves out that TensorStore (orbax's
array storage) reads on every download: the object's generation.

`environment(url)` is what a process needs to reach it: gcsfs (etils.epath's gs:// backend) through
STORAGE_EMULATOR_HOST, TensorStore through TENSORSTORE_GCS_HTTP_URL, ArrayRecord's reader (tfds data
sets) through CLOUD_STORAGE_EMULATOR_ENDPOINT. gcsfs's extended file system
asks a control-plane API for the bucket's layout, which the emulator lacks; its plain one is used.
"""

import contextlib
import functools

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects


def _with_generation(download):
  @functools.wraps(download)
  def wrapped(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    with contextlib.suppress(Exception):   # not found: the 404 says it
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj['metageneration']
  return wrapped


def _patch_downloads() -> None:
  original = getattr(objects.download, '__wrapped__', objects.download)
  patched = _with_generation(original)
  objects.download = patched   # objects.get calls it for ?alt=media
  for _, handlers in emulator.HANDLERS:
    for method, handler in handlers.items():
      if handler is original:
        handlers[method] = patched


@contextlib.contextmanager
def running(bucket: str):
  """Yields the URL of an emulator holding the empty bucket `bucket`; stops it afterwards."""
  _patch_downloads()
  server = emulator.create_server('127.0.0.1', 0, in_memory=True, default_bucket=bucket)
  server.start()
  try:
    host, port = server._api._httpd.server_address   # pylint: disable=protected-access
    yield f'http://{host}:{port}'
  finally:
    server.stop()


def environment(url: str) -> dict:
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'EPATH_USE_TF': 'false'}
