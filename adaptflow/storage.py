"""Read and write bytes at local paths and ``s3://`` URIs, with errors a user can act on.

Every function takes a URI: a local path (absolute or relative, optionally ``file://``) or
``s3://bucket/key``. S3 goes through ``pyarrow.fs.S3FileSystem`` configured from the standard AWS
environment: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (S3-compatible stores such as MinIO),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and the usual credential chain (environment variables,
``~/.aws`` files, instance metadata).

Failures are translated into :class:`~adaptflow.errors.DataError` naming the URI. Transient ones
(endpoint unreachable, throttling, 5xx) become :class:`StorageUnavailable`, a ``DataError`` subclass,
so callers can retry exactly those and fail fast on everything else.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from adaptflow.errors import DataError

_S3_HINT = "check the bucket and key, and AWS_ENDPOINT_URL if you use an S3-compatible store"

# AWS SDK error names (as pyarrow prints them: "AWS Error NAME during ...") that mean "try again
# later" rather than "your request is wrong".
_TRANSIENT_AWS_ERRORS = frozenset(
    {
        "NETWORK_CONNECTION",
        "SERVICE_UNAVAILABLE",
        "SLOW_DOWN",
        "THROTTLING",
        "REQUEST_TIMEOUT",
        "REQUEST_TIME_TOO_SKEWED",
        "INTERNAL_FAILURE",
    }
)
_CREDENTIAL_AWS_ERRORS = frozenset(
    {
        "ACCESS_DENIED",
        "INVALID_ACCESS_KEY_ID",
        "SIGNATURE_DOES_NOT_MATCH",
        "MISSING_AUTHENTICATION_TOKEN",
        "INVALID_CLIENT_TOKEN_ID",
        "EXPIRED_TOKEN",
        "UNRECOGNIZED_CLIENT",
    }
)
_AWS_ERROR_NAME = re.compile(r"AWS Error ([A-Z_]+)")
_HTTP_5XX = re.compile(r"HTTP status 5\d\d")


class StorageUnavailable(DataError):
    """The storage endpoint could not be reached or asked us to back off; retrying may succeed."""


def is_s3(uri: str | os.PathLike) -> bool:
    """True when ``uri`` is an ``s3://`` URI (scheme compared case-insensitively)."""
    return str(uri)[:5].lower() == "s3://"


def join(base: str | os.PathLike, *parts: str) -> str:
    """Append path components to a local path or ``s3://`` URI, keeping its kind. A component that is absolute
    or climbs out (``..``) is refused: paths built from recipe values stay under their base."""
    for part in parts:
        pieces = str(part).replace("\\", "/").split("/")
        if str(part).startswith(("/", "\\")) or ".." in pieces or ":" in pieces[0]:
            raise ValueError(f"path component {part!r} would leave {base}: use a plain relative name")
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(_local_path(base), *parts))


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself.

    ``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``, as in the AWS SDKs and CLI.
    """
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem_for(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``uri`` and the path of ``uri`` inside it.

    Local paths come back absolute. For ``s3://bucket/key`` the path is ``bucket/key`` and the
    filesystem reflects the AWS environment at call time (filesystems are cached per endpoint and
    region, so changing those variables takes effect on the next call).
    """
    if is_s3(uri):
        bucket, key = _split_s3(str(uri))
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        return _s3_filesystem(s3_endpoint(), region), f"{bucket}/{key}" if key else bucket
    return _local_filesystem(), str(_local_path(uri))


def exists(uri: str | os.PathLike) -> bool:
    """True when a file (or an S3 object) exists at ``uri``; a missing bucket counts as missing."""
    fs, path = filesystem_for(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as exc:
        raise _translate(exc, str(uri), "file") from exc


def open_input(uri: str | os.PathLike, *, what: str = "file", random_access: bool = False) -> pafs.NativeFile:
    """Open ``uri`` for sequential binary reading (``random_access``: seekable, as parquet's reader needs); the
    caller closes it (use ``with``).

    ``what`` names the file in error messages ("corpus file not found: ..."). Raises ``DataError``
    when the file, key or bucket does not exist (or ``uri`` is a directory), ``StorageUnavailable``
    when the S3 endpoint cannot be reached.
    """
    fs, path = filesystem_for(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            raise DataError(f"{what} {uri} is a directory; expected a single file")
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        return fs.open_input_file(path) if random_access else fs.open_input_stream(path)
    except OSError as exc:
        raise _translate(exc, str(uri), what) from exc


def read_bytes(uri: str | os.PathLike, *, what: str = "file") -> bytes:
    """The whole content of ``uri``. Errors as for :func:`open_input`."""
    stream = open_input(uri, what=what)
    try:
        with stream:
            return stream.read()
    except OSError as exc:
        raise _translate(exc, str(uri), what) from exc


def makedirs(uri: str | os.PathLike) -> None:
    """Create the directory ``uri`` and its parents locally; a no-op on S3, which has no directories."""
    if is_s3(uri):
        return
    path = _local_path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create directory {path}: {exc} (check permissions and free space)") from exc


def write_bytes_atomic(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that readers see either the old content or all of the new.

    Locally the bytes go to a temporary file in the target directory (created if needed), which is
    then renamed over the target; a crash leaves at most a hidden ``.*.tmp`` file, never a
    truncated target. On S3 the object only becomes visible once the upload completes.
    """
    if is_s3(uri):
        fs, path = filesystem_for(uri)
        try:
            with fs.open_output_stream(path) as out:
                out.write(data)
        except OSError as exc:
            raise _translate(exc, str(uri), "file") from exc
        return

    target = _local_path(uri)
    makedirs(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise DataError(f"cannot write {target}: {exc} (check permissions and free space)") from exc
        raise


def put_file(local: str | os.PathLike, uri: str) -> None:
    """Copy the file `local` to `uri`, which appears whole: renamed into place locally, uploaded in one object on
    S3 (an object is visible only once its upload completes)."""
    if not is_s3(uri):
        target = _local_path(uri)
        makedirs(target.parent)
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(local, staging)
            os.replace(staging, target)
        except OSError as exc:
            raise DataError(f"cannot write {target}: {exc} (check permissions and free space)") from exc
        finally:
            staging.unlink(missing_ok=True)
        return
    fs, path = filesystem_for(uri)
    try:
        with open(local, "rb") as source, fs.open_output_stream(path) as out:
            while chunk := source.read(16 << 20):
                out.write(chunk)
    except OSError as exc:
        raise _translate(exc, str(uri), "file") from exc


def get_file(uri: str, local: str | os.PathLike, *, what: str = "file") -> None:
    """Copy the file at `uri` to the local path `local`, which appears whole (written aside, then renamed)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    try:
        with open_input(uri, what=what) as source, staging.open("wb") as out:
            while chunk := source.read(16 << 20):
                out.write(chunk)
        os.replace(staging, local)
    except OSError as exc:
        raise _translate(exc, str(uri), what) from exc
    finally:
        staging.unlink(missing_ok=True)


def upload_directory(local: str | os.PathLike, uri: str, *, last: str | None = None) -> None:
    """Copy every file under `local` to `uri` with the same relative names. The file named `last` goes last,
    so a reader that waits for it sees a complete copy."""
    local = Path(local)
    fs, base = filesystem_for(uri)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    try:
        if not is_s3(uri):
            fs.create_dir(base, recursive=True)
        for file in files:
            target = f"{base}/{file.relative_to(local).as_posix()}"
            if not is_s3(uri):
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with file.open("rb") as source, fs.open_output_stream(target) as out:
                while chunk := source.read(16 << 20):
                    out.write(chunk)
    except OSError as exc:
        raise _translate(exc, str(uri), "directory") from exc


def download_directory(uri: str, local: str | os.PathLike) -> None:
    """Copy every file under `uri` into `local`, which appears whole (written aside, then renamed)."""
    local = Path(local)
    fs, base = filesystem_for(uri)
    staging = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    try:
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            target = staging / info.path[len(base):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as source, target.open("wb") as out:
                while chunk := source.read(16 << 20):
                    out.write(chunk)
        os.replace(staging, local)
    except OSError as exc:
        raise _translate(exc, str(uri), "directory") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def list_directories(uri: str) -> list[str]:
    """Names of the directories (S3: common prefixes) directly under `uri`; none when it does not exist."""
    fs, base = filesystem_for(uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError as exc:
        raise _translate(exc, str(uri), "directory") from exc
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)


def is_directory(uri: str | os.PathLike) -> bool:
    """True for a local directory, or an S3 URI ending in "/" (a prefix: S3 has no directories)."""
    return str(uri).endswith("/") if is_s3(uri) else _local_path(uri).is_dir()


def list_files(uri: str) -> list[str]:
    """Every file under the directory or S3 prefix `uri`, recursively, as URIs of its kind, in name order
    (hidden files, whose names start with "." or "_", left out)."""
    fs, base = filesystem_for(str(uri).rstrip("/") if is_s3(uri) else uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise _translate(exc, str(uri), "directory") from exc
    names = sorted(e.path[len(base):].lstrip("/") for e in entries if e.type == pafs.FileType.File)
    names = [n for n in names if not any(part.startswith((".", "_")) for part in n.split("/"))]
    return [join(uri, *name.split("/")) for name in names]


def remove_directory(uri: str) -> None:
    fs, base = filesystem_for(uri)
    try:
        fs.delete_dir(base)
    except OSError as exc:
        raise _translate(exc, str(uri), "directory") from exc


def _local_path(uri: str | os.PathLike) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text).expanduser().absolute()


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise DataError(f"invalid S3 URI {uri!r}: expected s3://bucket/key")
    return bucket, key


@functools.lru_cache(maxsize=1)
def _local_filesystem() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    # pyarrow's FileSystem.from_uri reads AWS_ENDPOINT_URL itself, but the S3FileSystem constructor
    # does not, so the override is passed explicitly. Three attempts with a short connect timeout
    # keep an unreachable endpoint to a couple of seconds; longer outages are the caller's retries.
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        region=region,
        connect_timeout=5,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def _translate(exc: OSError, uri: str, what: str) -> DataError:
    """Turn a filesystem OSError for ``uri`` into a DataError that says what to do about it."""
    if not is_s3(uri):
        if isinstance(exc, FileNotFoundError):
            return DataError(f"{what} not found: {uri} (check the path)")
        if isinstance(exc, PermissionError):
            return DataError(f"cannot read {what} {uri}: permission denied (check file permissions)")
        return DataError(f"cannot access {what} {uri}: {exc}")

    match = _AWS_ERROR_NAME.search(str(exc))
    name = match.group(1) if match else ""
    if name in _TRANSIENT_AWS_ERRORS or _HTTP_5XX.search(str(exc)):
        endpoint = s3_endpoint() or "AWS S3"
        return StorageUnavailable(
            f"S3 endpoint {endpoint} unavailable while accessing {uri}: {exc} "
            "(check the network, that the store is running, and AWS_ENDPOINT_URL)"
        )
    if name in _CREDENTIAL_AWS_ERRORS:
        return DataError(
            f"access to {uri} denied: {exc} (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, and the bucket policy)"
        )
    if name == "NO_SUCH_BUCKET" or isinstance(exc, FileNotFoundError):
        bucket, _ = _split_s3(uri)
        if name == "NO_SUCH_BUCKET" or not _bucket_exists(bucket):
            return DataError(
                f"S3 bucket {bucket!r} not found for {what} {uri} (create the bucket, or check its "
                "name and AWS_ENDPOINT_URL if you use an S3-compatible store)"
            )
        return DataError(f"{what} not found: {uri} ({_S3_HINT})")
    return DataError(f"cannot access {what} {uri}: {exc} ({_S3_HINT})")


def _bucket_exists(bucket: str) -> bool:
    fs, _ = filesystem_for(f"s3://{bucket}")
    try:
        return fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:
        # Only used to sharpen a not-found message; if the check itself fails, blame the key.
        return True
