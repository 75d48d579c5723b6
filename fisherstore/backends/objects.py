"""Bytes by key in an S3-compatible object store: the medium under ``s3://`` stores.

The same interface as :class:`~fisherstore.backends.files.LocalFiles`, over obstore's
``S3Store``. What the commit protocol needs maps onto objects this way:

* an atomic replace is a plain PUT: S3 never shows a half-written object, so a manifest
  PUT is the commit, and no temp files or directory fsyncs exist;
* durability needs no ``syncfs``: an acknowledged PUT is durable;
* "directories" are key prefixes, listed with a ``/`` delimiter;
* the one-writer lock is a lease (:class:`~fisherstore.engine.lock.ObjectLock`): the
  lock object is created by a conditional PUT (``If-None-Match: *``) and renewed by
  conditional PUTs (``If-Match: <ETag>``), where the server supports them (docs/format.md
  says what happens where it does not).

Credentials, region and endpoint come from the standard ``AWS_*`` environment variables
(``AWS_ENDPOINT_URL`` included), overridden by ``storage_options``. Two of those options
are fisherstore's own and bound every request: ``timeout`` (seconds per attempt, default
:data:`DEFAULT_TIMEOUT`) and ``retries`` (default :data:`DEFAULT_RETRIES`); a request that
gets no answer fails after about ``timeout × (retries + 1)`` seconds.

Every failure of the object store (a closed endpoint, missing credentials, a refused or
stalled connection) is raised as :class:`~fisherstore.errors.StorageError` naming the
operation, the object and the endpoint (:meth:`ObjectFiles.errors`, the one seam that the
zarr and TensorStore backends use too).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from ..errors import CorruptStoreError, FisherStoreError, InvalidArgumentError, StorageError
from .files import MAX_DOC_BYTES

__all__ = ["ObjectFiles", "s3_options", "s3_limits", "DEFAULT_TIMEOUT", "DEFAULT_RETRIES"]

#: Seconds one request attempt may take (connecting, sending, the whole answer) before it is abandoned.
DEFAULT_TIMEOUT = 30.0
#: Attempts after the first for a request that failed to connect, timed out or got a 5xx answer.
DEFAULT_RETRIES = 3
#: ``storage_options`` keys that are fisherstore's, not obstore's S3 settings.
_OWN = ("timeout", "retries")
#: The object that tells a writer the server's time (the lease's age is measured on the server's clock).
CLOCK_NAME = ".fisherstore.lock.clock"

#: Environment variables and their obstore config keys (AWS's own names).
_ENV = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
    "AWS_REGION": "region",
    "AWS_DEFAULT_REGION": "region",
    "AWS_ENDPOINT_URL": "endpoint",
    "AWS_ENDPOINT_URL_S3": "endpoint",
}
#: TensorStore reports a failed request as a ValueError starting with one of these absl codes.
_TS_STORAGE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED", "ABORTED",
                     "INTERNAL", "UNKNOWN")


def s3_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The S3 settings for obstore: ``AWS_*`` environment variables, then ``storage_options`` over them.

    Usage: ``S3Store(bucket, config=s3_options({"endpoint": "http://127.0.0.1:9000"}))``.
    fisherstore's own keys (``timeout``, ``retries``: :func:`s3_limits`) are left out.
    """
    opts: dict[str, Any] = {}
    for env, key in _ENV.items():
        if os.environ.get(env) and key not in opts:
            opts[key] = os.environ[env]
    opts.update({k: v for k, v in (storage_options or {}).items() if v is not None and k not in _OWN})
    if str(opts.get("endpoint", "")).startswith("http://"):
        opts.setdefault("allow_http", True)
    return opts


def s3_limits(storage_options: Mapping[str, Any] | None) -> tuple[float, int]:
    """``(timeout, retries)`` from ``storage_options``, checked; defaults :data:`DEFAULT_TIMEOUT`, :data:`DEFAULT_RETRIES`.

    Usage: ``timeout, retries = s3_limits({"timeout": 5})``.
    """
    so = storage_options or {}
    timeout, retries = so.get("timeout", DEFAULT_TIMEOUT), so.get("retries", DEFAULT_RETRIES)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e6:
        raise InvalidArgumentError(f"storage_options['timeout'] must be a positive number of seconds (default "
                                   f"{DEFAULT_TIMEOUT:g}), got {timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
        raise InvalidArgumentError(f"storage_options['retries'] must be a whole number from 0 to 100 (default "
                                   f"{DEFAULT_RETRIES}), got {retries!r}")
    return float(timeout), retries


def _client_settings(timeout: float, retries: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """obstore's ``client_options`` and ``retry_config`` that bound a request to about ``timeout × (retries + 1)``.

    obstore's own defaults retry for three minutes (10 retries, ``retry_timeout`` 180 s):
    a server that accepts connections and never answers held a read for 181 s.
    """
    step = datetime.timedelta(seconds=timeout)
    client = {"timeout": step, "connect_timeout": min(step, datetime.timedelta(seconds=5))}
    retry = {"max_retries": retries, "retry_timeout": step * (retries + 1),
             "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                         "max_backoff": min(step, datetime.timedelta(seconds=15)), "base": 2}}
    return client, retry


def _make_store(bucket: str, prefix: str, config: dict[str, Any], timeout: float, retries: int) -> Any:
    """obstore's ``S3Store``; a setting it refuses is an :class:`InvalidArgumentError` naming the key."""
    from obstore.store import S3Store

    client, retry = _client_settings(timeout, retries)
    try:
        return S3Store(bucket, prefix=prefix or None, config=config, client_options=client, retry_config=retry)
    except Exception as e:  # obstore raises TypeError, ValueError or UnknownConfigurationKeyError
        bad = []
        for k, v in config.items():  # building a client makes no request: find the culprits one by one
            try:
                S3Store(bucket, config={k: v})
            except Exception:
                bad.append(k)
        raise InvalidArgumentError(
            f"storage_options {bad or sorted(config)} not accepted for {bucket!r} ({' '.join(str(e).split())}). "
            "Use obstore's S3 settings (endpoint, region, access_key_id, secret_access_key, session_token, "
            "allow_http, ...) as strings, and fisherstore's own 'timeout' (seconds) and 'retries' (a whole number)."
        ) from None


class ObjectFiles:
    """An ``s3://bucket/prefix`` location as a store of bytes by key.

    Args:
        url: ``s3://bucket/prefix``.
        read_only: refuse every mutation.
        storage_options: obstore S3 settings (``endpoint``, ``region``, ``access_key_id``,
            ``secret_access_key``, ...) over the ``AWS_*`` environment variables, and
            ``timeout`` (seconds per attempt, default 30) and ``retries`` (default 3).

    Usage: ``ObjectFiles("s3://bucket/runs/f", read_only=True).get("zarr.json")``.
    """

    kind = "s3"

    def __init__(self, url: str, *, read_only: bool, storage_options: Mapping[str, Any] | None = None) -> None:
        try:
            import obstore  # noqa: F401
        except ImportError:
            raise InvalidArgumentError(
                "s3:// stores need obstore: pip install 'fisherstore[s3]' (or pip install obstore)") from None
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise InvalidArgumentError(f"{url!r} is not an s3://bucket/prefix URL")
        self.url = url.rstrip("/")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.read_only = read_only
        self.timeout, self.retries = s3_limits(storage_options)
        self.options = s3_options(storage_options)
        self.endpoint = str(self.options.get("endpoint") or f"AWS S3 ({self.options.get('region', 'default region')})")
        self.root = self.url
        self.store = _make_store(self.bucket, self.prefix, self.options, self.timeout, self.retries)
        #: The writer lock's check, run before every mutation (set by ObjectLock while it holds the lease).
        self.guard: Callable[[], None] | None = None

    def path(self, key: str) -> str:
        parts = [k for k in key.split("/") if k]
        if any(k in (".", "..") for k in parts):
            raise CorruptStoreError(f"key {key!r} would leave the store at {self.url!r}; fisherstore never goes there")
        return "/".join(parts)

    def url_of(self, key: str) -> str:
        return f"{self.url}/{self.path(key)}" if self.path(key) else self.url

    # -- errors -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def errors(self, op: str, key: str, mutate: bool = False) -> Iterator[None]:
        """Raise every object-store failure inside as a :class:`StorageError` naming ``op``, the object and the endpoint.

        ``mutate``: the writer lock's lease is checked first (a writer whose lease was
        taken over must not write, commit or delete). Absence (``FileNotFoundError``) and
        fisherstore's own errors pass through.

        Usage: ``with medium.errors("PUT", key, mutate=True): obstore.put(...)``.
        """
        if mutate and self.guard is not None:
            self.guard()
        try:
            yield
        except (FisherStoreError, FileNotFoundError):
            raise
        except Exception as e:
            if not _is_storage_failure(e):
                raise
            raise StorageError(self.describe(op, key, e)) from e

    def describe(self, op: str, key: str, e: BaseException) -> str:
        """One line: what failed, where, why, and what to check."""
        return (f"{op} {self.url_of(key)} at {self.endpoint} failed: {self._reason(e)}. Check the endpoint, the "
                "credentials (storage_options or the AWS_* variables) and that the server is up; each request "
                f"gives up after {self.timeout:g} s and {self.retries} retries (storage_options={{'timeout': "
                "seconds, 'retries': n}).")

    def _reason(self, e: BaseException) -> str:
        text = str(e)
        head, _, debug = text.partition("Debug source:")
        if "169.254.169.254" in text:  # obstore's last resort for credentials: the EC2 metadata service
            return ("no AWS credentials: none in storage_options or the AWS_* variables, and no instance metadata "
                    "service gave any")
        head = re.sub(r"\s*\[tensorstore_spec=.*", "", head, flags=re.S)  # TensorStore appends its whole spec
        head = " ".join(re.sub(r"<\?xml.*", "", head, flags=re.S).split()).rstrip(" :-")
        # obstore's line repeats the method, URL and retry settings this message already gives: keep the cause.
        head = re.sub(r"^Generic \w+ error: ", "", head)
        m = re.match(r"Error performing \w+ \S+ in [^,-]+(?:, after (\d+) retries)?[^-]*- (.+)$", head)
        if m:
            head = m.group(2) + (f", after {m.group(1)} retries" if m.group(1) else "")
        code, msg = re.search(r"<Code>([^<]*)</Code>", text), re.search(r"<Message>([^<]*)</Message>", text)
        if code:
            head += f": {code.group(1)}" + (f" ({msg.group(1)})" if msg else "")
        cause = re.search(r'message: "([^"]+)"', debug)
        if cause and cause.group(1) not in head:
            head += f" ({cause.group(1)})"
        elif re.search(r"timed? ?out|Timeout", text) and "timed out" not in head:
            head += f" (no answer within {self.timeout:g} s)"
        return head[:400] or type(e).__name__

    # -- bytes ----------------------------------------------------------------------------
    def get(self, key: str, limit: int = MAX_DOC_BYTES) -> bytes | None:
        got = self.get_tagged(key, limit)
        return None if got is None else got[0]

    def get_tagged(self, key: str, limit: int = MAX_DOC_BYTES) -> tuple[bytes, str | None, datetime.datetime] | None:
        """``(bytes, ETag, Last-Modified)`` of ``key`` in one GET, or None if absent."""
        import obstore as obs

        with self.errors("GET", key):
            try:
                r = obs.get(self.store, self.path(key))
            except FileNotFoundError:
                return None
            if r.meta["size"] > limit:
                raise CorruptStoreError(f"{self.url_of(key)!r} is {r.meta['size']} bytes, more than the {limit} "
                                        "fisherstore reads here; the store is damaged or crafted")
            return bytes(r.bytes()), r.meta.get("e_tag"), r.meta["last_modified"]

    def read_bounded(self, key: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of ``key`` in one GET (a range request), or None if absent."""
        import obstore as obs

        with self.errors("GET", key):
            try:
                return bytes(obs.get_range(self.store, self.path(key), start=0, length=limit))
            except FileNotFoundError:
                return None
            except Exception as e:  # a range past the end of a short object: read it whole below
                if "range" not in str(e).lower():
                    raise
        data = self.get(key, limit=1 << 40)
        return None if data is None else data[:limit]

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """Replace ``key``: a PUT is atomic and, once acknowledged, durable."""
        self.write(key, data)

    def write(self, key: str, data: bytes) -> None:
        import obstore as obs

        self.check_writable()
        with self.errors("PUT", key, mutate=True):
            obs.put(self.store, self.path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent (a conditional PUT); False if it exists."""
        return self.create_tagged(key, data) is not None

    def create_tagged(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if absent (``If-None-Match: *``): its ETag, or None if it exists.

        Not checked against the writer's lease: the lock itself uses it.
        """
        import obstore as obs

        self.check_writable()
        with self.errors("PUT (if absent)", key):
            try:
                return obs.put(self.store, self.path(key), data, mode="create")["e_tag"] or ""
            except FileExistsError:
                return None
            except Exception as e:  # obstore's AlreadyExistsError is not a FileExistsError
                if type(e).__name__ in ("AlreadyExistsError", "PreconditionError"):
                    return None
                raise

    def replace_if(self, key: str, data: bytes, e_tag: str | None) -> str | None:
        """Replace ``key`` only if its ETag is still ``e_tag`` (``If-Match``): the new ETag, or None if it changed.

        Not checked against the writer's lease: the lease's own heartbeat uses it.
        """
        import obstore as obs

        self.check_writable()
        with self.errors("PUT (if unchanged)", key):
            try:
                return obs.put(self.store, self.path(key), data, mode={"e_tag": e_tag})["e_tag"] or ""
            except FileNotFoundError:
                return None
            except Exception as e:
                if type(e).__name__ in ("PreconditionError", "AlreadyExistsError", "NotFoundError"):
                    return None
                raise

    def remove(self, key: str) -> None:
        """Delete the one object ``key`` (no listing, not checked against the lease: the lock's own release)."""
        import obstore as obs

        self.check_writable()
        with self.errors("DELETE", key):
            with contextlib.suppress(FileNotFoundError):
                obs.delete(self.store, self.path(key))

    def server_now(self) -> datetime.datetime:
        """The server's clock, read from the Last-Modified of an object written now.

        A lease's age is measured against the server's clock, never this machine's: two
        writers on two hosts need not agree on the time. (S3 keeps whole seconds.)
        """
        import obstore as obs

        self.check_writable()
        with self.errors("PUT", CLOCK_NAME):
            obs.put(self.store, self.path(CLOCK_NAME), b"")
            now = obs.head(self.store, self.path(CLOCK_NAME))["last_modified"]
        with contextlib.suppress(Exception):
            self.remove(CLOCK_NAME)
        return now

    def exists(self, key: str) -> bool:
        return self.version(key) is not None

    def version(self, key: str) -> str | None:
        """The object's ETag: a replace always changes it. None if absent."""
        import obstore as obs

        with self.errors("HEAD", key):
            try:
                return obs.head(self.store, self.path(key))["e_tag"]
            except FileNotFoundError:
                return None

    # -- tree -----------------------------------------------------------------------------
    def _listing(self, key: str) -> dict[str, Any]:
        import obstore as obs

        prefix = self.path(key)
        with self.errors("LIST", key):
            return obs.list_with_delimiter(self.store, prefix or None)

    def list_dirs(self, key: str) -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._listing(key)["common_prefixes"])

    def entries(self, key: str) -> list[str]:
        lst = self._listing(key)
        return sorted([p.rstrip("/").rsplit("/", 1)[-1] for p in lst["common_prefixes"]]
                      + [o["path"].rsplit("/", 1)[-1] for o in lst["objects"]])

    def _objects(self, key: str) -> Iterator[dict[str, Any]]:
        import obstore as obs

        prefix = self.path(key)
        with self.errors("LIST", key):
            for batch in obs.list(self.store, prefix + "/" if prefix else None):
                yield from batch

    def list_files(self, key: str) -> list[str]:
        prefix = self.path(key)
        out = [o["path"][len(prefix) + 1:] if prefix else o["path"] for o in self._objects(key)]
        if not out and self.version(key) is not None:
            return [""]
        return out

    def delete(self, key: str) -> None:
        import obstore as obs

        self.check_writable()
        with self.errors("DELETE", key, mutate=True):
            prefix = self.path(key)
            paths = [prefix] if prefix and self.version(key) is not None else []
            paths += [f"{prefix}/{rel}" if prefix else rel for rel in self.list_files(key) if rel]
            for i in range(0, len(paths), 1000):  # DeleteObjects takes at most 1000 keys
                obs.delete(self.store, paths[i:i + 1000])

    def ensure(self) -> None:
        """Nothing to create: a prefix exists as soon as an object is under it."""

    def is_dir(self) -> bool:
        return True

    def visible_names(self) -> list[str]:
        return [n for n in self.entries("") if not n.startswith(".")]

    def check_no_links(self, key: str) -> None:
        """Object stores have no links."""

    # -- capacity and durability ----------------------------------------------------------
    def size(self, key: str = "", chunks_only: bool = False) -> int:
        return sum(o["size"] for o in self._objects(key) if not chunks_only or "/c/" in "/" + o["path"])

    def free_bytes(self) -> int | None:
        return None

    def temp_files(self, depth: int = 3) -> list[str]:
        return []  # a PUT needs no temp object

    def sync(self) -> None:
        """An acknowledged PUT is durable: nothing to sync."""

    def check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(30, "backend is read-only", self.url)


def _is_storage_failure(e: BaseException) -> bool:
    """Whether ``e`` is the object store failing (not a bug, not a value fisherstore raised)."""
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    try:
        from obstore.exceptions import BaseError
    except ImportError:  # pragma: no cover - obstore is there whenever an ObjectFiles exists
        BaseError = ()  # noqa: N806
    if isinstance(e, BaseError):
        return True
    # TensorStore's S3 client: an absl status as the ValueError's text.
    return isinstance(e, ValueError) and str(e).split(":", 1)[0].strip() in _TS_STORAGE_CODES
