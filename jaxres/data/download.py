"""Downloading one file over HTTP(S), checksum-verified and written atomically (stdlib only).

`download_file(url, destination, md5)` streams the response into a temporary file beside
`destination`, checks its MD5 and only then renames it into place, so `destination` either
does not exist or holds the complete, verified file. Every failure (HTTP status, unreachable
host, a connection that drops mid-way, a wrong checksum) raises `JaxresError` naming the URL
and what happened, and leaves nothing behind: a rerun starts clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from typing import BinaryIO

from jaxres.errors import JaxresError

CHUNK_BYTES = 1 << 20  # bytes read from the connection per step
DEFAULT_TIMEOUT_SECONDS = 60.0  # for connecting and for each read, not for the whole download


def download_file(
    url: str,
    destination: str | os.PathLike,
    md5: str,
    *,
    progress: bool = False,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> pathlib.Path:
    """Downloads `url` to `destination` and checks that its MD5 digest is `md5`.

    The bytes go to a temporary file in `destination`'s folder (created when missing), which
    replaces `destination` (`os.replace`, atomic) only once it is complete and verified.

    Args:
      url: the address to fetch (http, https, or anything `urllib.request.urlopen` accepts).
      destination: the final path of the file; an existing file there is overwritten.
      md5: the expected MD5 digest, 32 hex digits (either case).
      progress: show a tqdm progress bar (bytes, on stderr).
      timeout: seconds to wait for the connection and for each read before giving up.

    Returns:
      `destination` as a `pathlib.Path`.

    Raises:
      JaxresError: naming `url` when the download fails (HTTP error, unreachable host, the
        connection closing before Content-Length bytes arrived, a timeout), when the digest is
        not `md5` (with both digests), or when the folder cannot be written. No temporary or
        partial file is left behind.
    """
    destination = pathlib.Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=destination.name + ".", suffix=".part")
    except OSError as err:
        raise JaxresError(f"cannot download {url} into {destination.parent}: {err}") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            actual_md5 = _stream_to_file(url, file, progress=progress, timeout=timeout, label=destination.name)
        if actual_md5 != md5.lower():
            raise JaxresError(
                f"download of {url} is corrupt: MD5 checksum mismatch, expected {md5.lower()}, got {actual_md5}; "
                "nothing was kept, run again to retry"
            )
        os.chmod(temp_name, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(temp_name, destination)
    except OSError as err:  # writing the temporary file or renaming it
        raise JaxresError(f"cannot write the download of {url} to {destination}: {err}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
    return destination


def _stream_to_file(url: str, file: BinaryIO, *, progress: bool, timeout: float, label: str) -> str:
    """Writes the body of `url` to `file`; returns its MD5 hex digest.

    Raises JaxresError naming `url` for HTTP errors, network errors and a body shorter than its
    Content-Length (http.client returns a short body without complaint when the server closes).
    """
    from tqdm import tqdm

    digest = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "jaxres"})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length_header = response.headers.get("Content-Length", "")
            expected = int(length_header) if length_header.strip().isdigit() else None
            with tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"downloading {label}",
                disable=not progress,
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise JaxresError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:  # unreachable host, refused connection, bad scheme
        raise JaxresError(f"download of {url} failed: {err.reason}") from None
    except (http.client.HTTPException, OSError) as err:  # dropped connection, timeout, reset
        if isinstance(err, http.client.IncompleteRead):  # its bytes were read but not returned
            received += len(err.partial)
        raise JaxresError(
            f"download of {url} failed after {received} bytes: {type(err).__name__}: {err}; "
            "nothing was kept, run again to retry"
        ) from None
    if expected is not None and received != expected:
        raise JaxresError(
            f"download of {url} failed: the connection closed after {received} of {expected} bytes; "
            "nothing was kept, run again to retry"
        )
    return digest.hexdigest()
