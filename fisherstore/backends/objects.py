"""Bytes by key in an S3-compatible object store: the medium under ``s3://`` stores.

The same interface as :class:`~fisherstore.backends.files.LocalFiles`, over obstore's
``S3Store``. What the commit protocol needs maps onto objects this way:

* an atomic replace is a plain PUT: S3 never shows a half-written object, so a manifest
  PUT is the commit, and no temp files or directory fsyncs exist;
* durability needs no ``syncfs``: an acknowledged PUT is durable;
* "directories" are key prefixes, listed with a ``/`` delimiter;
* the one-writer lock is a conditional PUT (``If-None-Match: *``) of the lock object
  (:meth:`create`), where the server supports it (docs/format.md says what happens where
  it does not).

Credentials, region and endpoint come from the standard ``AWS_*`` environment variables
(``AWS_ENDPOINT_URL`` included), overridden by ``storage_options``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from ..errors import CorruptStoreError, InvalidArgumentError
from .files import MAX_DOC_BYTES

__all__ = ["ObjectFiles", "s3_options"]

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


def s3_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The S3 settings: ``AWS_*`` environment variables, then ``storage_options`` over them."""
    opts: dict[str, Any] = {}
    for env, key in _ENV.items():
        if os.environ.get(env) and key not in opts:
            opts[key] = os.environ[env]
    opts.update({k: v for k, v in (storage_options or {}).items() if v is not None})
    if str(opts.get("endpoint", "")).startswith("http://"):
        opts.setdefault("allow_http", True)
    return opts


class ObjectFiles:
    """An ``s3://bucket/prefix`` location as a store of bytes by key.

    Args:
        url: ``s3://bucket/prefix``.
        read_only: refuse every mutation.
        storage_options: obstore S3 settings (``endpoint``, ``region``, ``access_key_id``,
            ``secret_access_key``, ...) over the ``AWS_*`` environment variables.
    """

    kind = "s3"

    def __init__(self, url: str, *, read_only: bool, storage_options: Mapping[str, Any] | None = None) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise InvalidArgumentError(
                "s3:// stores need obstore: pip install 'fisherstore[s3]' (or pip install obstore)") from None
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise InvalidArgumentError(f"{url!r} is not an s3://bucket/prefix URL")
        self.url = url.rstrip("/")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.read_only = read_only
        self.options = s3_options(storage_options)
        self.root = self.url
        self.store = S3Store(self.bucket, prefix=self.prefix or None, config=self.options)

    def path(self, key: str) -> str:
        parts = [k for k in key.split("/") if k]
        if any(k in (".", "..") for k in parts):
            raise CorruptStoreError(f"key {key!r} would leave the store at {self.url!r}; fisherstore never goes there")
        return "/".join(parts)

    def url_of(self, key: str) -> str:
        return f"{self.url}/{self.path(key)}"

    # -- bytes ----------------------------------------------------------------------------
    def get(self, key: str, limit: int = MAX_DOC_BYTES) -> bytes | None:
        import obstore as obs

        try:
            r = obs.get(self.store, self.path(key))
        except FileNotFoundError:
            return None
        if r.meta["size"] > limit:
            raise CorruptStoreError(f"{self.url_of(key)!r} is {r.meta['size']} bytes, more than the {limit} "
                                    "fisherstore reads here; the store is damaged or crafted")
        return bytes(r.bytes())

    def read_bounded(self, key: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of ``key`` in one GET (a range request), or None if absent."""
        import obstore as obs

        try:
            return bytes(obs.get_range(self.store, self.path(key), start=0, length=limit))
        except FileNotFoundError:
            return None
        except Exception as e:  # a range past the end of a short object: read it whole
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
        obs.put(self.store, self.path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent (a conditional PUT); False if it exists."""
        import obstore as obs

        self.check_writable()
        try:
            obs.put(self.store, self.path(key), data, mode="create")
        except FileExistsError:
            return False
        except Exception as e:  # obstore's AlreadyExistsError is not always a FileExistsError
            if type(e).__name__ == "AlreadyExistsError":
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        return self.version(key) is not None

    def version(self, key: str) -> str | None:
        """The object's ETag: a replace always changes it. None if absent."""
        import obstore as obs

        try:
            return obs.head(self.store, self.path(key))["e_tag"]
        except FileNotFoundError:
            return None

    # -- tree -----------------------------------------------------------------------------
    def _listing(self, key: str) -> dict[str, Any]:
        import obstore as obs

        prefix = self.path(key)
        return obs.list_with_delimiter(self.store, prefix or None)

    def list_dirs(self, key: str) -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._listing(key)["common_prefixes"])

    def entries(self, key: str) -> list[str]:
        lst = self._listing(key)
        return sorted([p.rstrip("/").rsplit("/", 1)[-1] for p in lst["common_prefixes"]]
                      + [o["path"].rsplit("/", 1)[-1] for o in lst["objects"]])

    def list_files(self, key: str) -> list[str]:
        import obstore as obs

        prefix = self.path(key)
        out = []
        for batch in obs.list(self.store, prefix + "/" if prefix else None):
            for o in batch:
                rel = o["path"][len(prefix) + 1:] if prefix else o["path"]
                out.append(rel)
        if not out and self.version(key) is not None:
            return [""]
        return out

    def delete(self, key: str) -> None:
        import obstore as obs

        self.check_writable()
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
        import obstore as obs

        prefix = self.path(key)
        total = 0
        for batch in obs.list(self.store, prefix + "/" if prefix else None):
            for o in batch:
                if not chunks_only or "/c/" in "/" + o["path"]:
                    total += o["size"]
        return total

    def free_bytes(self) -> int | None:
        return None

    def temp_files(self, depth: int = 3) -> list[str]:
        return []  # a PUT needs no temp object

    def sync(self) -> None:
        """An acknowledged PUT is durable: nothing to sync."""

    def check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(30, "backend is read-only", self.url)
