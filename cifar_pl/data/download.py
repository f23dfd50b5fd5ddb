"""Fetching dataset files: torchvision's download utilities (with MD5 verification) wrapped so that every
failure becomes one clear paragraph: what is missing, where we looked, the URL tried, and how to fix it.

A download goes to a temporary name and takes its real name only once its MD5 matches, so an interrupted or
corrupt download is never mistaken for the file by the next run."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from cifar_pl.errors import DatasetError
from cifar_pl.files import remove_stale_temporaries, temporary_path

# urllib has no timeout by default: a black-holed network would hang the run forever.
DOWNLOAD_TIMEOUT_S = 60.0


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _missing_message(title: str, looked_in: Sequence[Path], url: str, root: Path, problem: str) -> str:
    places = " and ".join(str(p) for p in looked_in)
    return (
        f"{title} is not available: looked in {places}. {problem} "
        f"To fix it, run again with internet access, or download {url} yourself and put it in {root}, "
        f"or point data.root at a folder that already holds the dataset (to try the pipeline without it, "
        f"run with data=synthetic)."
    )


def download_verified(title: str, url: str, md5: str, root: Path, looked_in: Sequence[Path]) -> Path:
    """Download ``url`` into ``root`` and check its MD5, or raise a ``DatasetError`` saying why not."""
    target = root / url.rsplit("/", 1)[-1]
    partial = temporary_path(target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)  # partial downloads of runs killed outright
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            download_url(url, str(root), filename=partial.name, md5=md5)
        os.replace(partial, target)
    except Exception as error:  # any failure of the transfer (URLError, timeouts, IncompleteRead, ...) is one
        # torchvision says "File not found or corrupted." when the downloaded file's MD5 differs
        corrupted = isinstance(error, RuntimeError) and "corrupted" in str(error)
        reason = "the file arrived corrupted (MD5 mismatch)" if corrupted else f"{type(error).__name__}: {error}"
        raise DatasetError(_missing_message(title, looked_in, url, root, f"The download failed: {reason}.")) from None
    finally:
        partial.unlink(missing_ok=True)  # never leave a partial download behind
    return target


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(title: str, url: str, md5: str, root: Path, expected: Sequence[Path], download: bool) -> None:
    """Make sure the files ``expected`` exist under ``root``: extract the archive from ``url`` (already in
    ``root`` with the right MD5, or downloaded when ``download``) and check that it held them."""
    archive = root / url.rsplit("/", 1)[-1]
    looked_in = [expected[0].parent, archive]
    if not check_integrity(str(archive), md5):
        if not download:
            problem = (
                f"{archive} exists but its MD5 does not match {md5} (a partial or corrupt download)."
                if archive.exists()
                else "Downloading is switched off (data.download=false)."
            )
            raise DatasetError(_missing_message(title, looked_in, url, root, problem))
        download_verified(title, url, md5, root, looked_in)
    extract_archive(str(archive), str(root))
    absent = [p for p in expected if not p.is_file()]
    if absent:
        raise DatasetError(
            f"{title}: {archive} was extracted into {root}, but {absent[0]} is not there. The archive is not the "
            f"expected {title} distribution; delete it and run again, or download {url} yourself."
        )
