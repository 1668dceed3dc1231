"""Pretrained weights from a local path or a URL, downloaded once into a cache.

``pretrained:`` (and every loader that takes a checkpoint path) accepts

- a local file: ``weights/vivit_fac_enc_k400.pyth`` (``~`` is expanded);
- an ``https://``, ``http://`` or ``file://`` URL: downloaded on first use into
  the cache folder, then read from there on every later use (no network);
- either of them followed by ``#sha256=<64 hex digits>``: the file's SHA-256
  must match (a download that does not is deleted and refused).

The cache folder is ``$EVENTFUL_PL_CACHE`` if set, else
``torch.hub.get_dir()/eventful_pl`` (``$TORCH_HOME/hub/eventful_pl``,
``~/.cache/torch/hub/eventful_pl`` by default). A URL's file there is named
``<12 hex digits of the URL's SHA-256>-<the URL's file name>``, so two URLs
with the same file name never share a file, and the suffix (``.pkl``,
``.pth``, ...) that tells the checkpoint reader the file's format is kept.
Downloads go to a temporary file in the same folder and are renamed into
place only once complete (and checked), so an interrupted download never
leaves a file that looks finished.

Only the bytes are fetched here; the file is read by
:func:`eventful_pl.checkpoints.read_checkpoint`, which keeps refusing
checkpoints that would run code unless ``trust_pretrained`` is set.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
from pathlib import Path

import torch

#: Environment variable naming the download cache folder.
CACHE_ENV = "EVENTFUL_PL_CACHE"

#: URL schemes that are downloaded (anything else with ``://`` is refused).
URL_SCHEMES = ("https", "http", "file")

_SHA256_SUFFIX = re.compile(r"^(?P<source>.+)#sha256=(?P<sha256>[0-9a-fA-F]*)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


class WeightsDownloadError(RuntimeError):
    """A URL could not be downloaded, or its file failed the SHA-256 check."""


def default_cache_dir() -> Path:
    """``$EVENTFUL_PL_CACHE``, else ``torch.hub.get_dir()/eventful_pl``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(torch.hub.get_dir()) / "eventful_pl"


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in str(source)


def split_sha256(source: str | os.PathLike) -> tuple[str, str | None]:
    """``("<source>", "<sha256>")`` of ``"<source>#sha256=<sha256>"``; ``(source, None)``
    without the suffix. The hash is lower-cased and must be 64 hex digits."""
    text = str(source)
    match = _SHA256_SUFFIX.match(text)
    if match is None:
        return text, None
    return match["source"], _check_sha256(match["sha256"], text)


def _check_sha256(sha256: str, source: str) -> str:
    digest = sha256.strip().lower()
    if not _HEX64.match(digest):
        raise ValueError(
            f"pretrained: {source!r}: the SHA-256 must be 64 hex digits, got {sha256!r} "
            "(write it as '#sha256=<64 hex digits>' after the path or URL, "
            "e.g. the output of `sha256sum <file>`)"
        )
    return digest


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def cache_file_name(url: str) -> str:
    """``<12 hex digits of sha256(url)>-<basename of the URL's path>`` (query dropped,
    unusual characters replaced by ``_``; ``weights`` when the path has no name)."""
    basename = urllib.parse.unquote(Path(urllib.parse.urlsplit(url).path).name)
    basename = _UNSAFE_NAME_CHARS.sub("_", basename).lstrip(".") or "weights"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{basename}"


def resolve_weights(
    source: str | os.PathLike,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """The local file of a weights ``source``: a path, or a URL downloaded once.

    Args:
        source: A local path or an ``https://`` / ``http://`` / ``file://`` URL,
            optionally followed by ``#sha256=<64 hex digits>``.
        sha256: The file's expected SHA-256 (instead of, or equal to, the suffix).
        cache_dir: Download folder (default: :func:`default_cache_dir`).
        progress: Show a progress bar (stderr) while downloading.

    Returns:
        The local path. A URL whose file is already in the cache is not
        fetched again; a download is written to a temporary file, checked
        against ``sha256`` if given (deleted on mismatch) and renamed into
        place. A local path is returned as is (after the hash check, if given);
        reading it is the checkpoint loader's job.

    Raises:
        ValueError: a malformed hash, two different hashes, or an unsupported
            URL scheme.
        WeightsDownloadError: the download failed, or a file's SHA-256 is not
            the expected one.
    """
    text, suffix_hash = split_sha256(source)
    if sha256 is not None:
        sha256 = _check_sha256(sha256, str(source))
        if suffix_hash is not None and suffix_hash != sha256:
            raise ValueError(
                f"pretrained: {source!r} ends in #sha256={suffix_hash} but the sha256 "
                f"given beside it is {sha256}; keep one of them"
            )
    expected = sha256 or suffix_hash
    if not is_url(text):
        path = Path(text).expanduser()
        if expected is not None and path.is_file():
            _verify(path, expected, str(path), remedy="check the file and the hash")
        return path
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ValueError(
            f"pretrained: cannot download {text!r}: the URL scheme {scheme!r} is not one of "
            f"{', '.join(s + '://' for s in URL_SCHEMES)}; download the file yourself and "
            "give its local path"
        )
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / cache_file_name(text)
    if target.is_file():
        if expected is not None:
            _verify(
                target,
                expected,
                text,
                remedy=f"delete the cached file {target} to download it again, or fix the hash",
            )
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.download"
    try:
        try:
            torch.hub.download_url_to_file(text, str(partial), progress=progress)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise WeightsDownloadError(
                f"pretrained: cannot download {text}: {error}. Check the URL and the network, "
                "or download the file yourself and give its local path"
            ) from error
        if expected is not None:
            _verify(partial, expected, text, remedy="check the URL and the hash")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _verify(path: Path, expected: str, name: str, remedy: str) -> None:
    """Raises :class:`WeightsDownloadError` unless ``path``'s SHA-256 is ``expected``."""
    actual = file_sha256(path)
    if actual != expected:
        raise WeightsDownloadError(
            f"pretrained: {name}: SHA-256 mismatch: expected {expected}, got {actual}"
            + ("; the download was deleted" if path.name.endswith(".download") else "")
            + f". {remedy[0].upper()}{remedy[1:]}"
        )
