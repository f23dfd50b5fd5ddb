"""Parsing the genuine on-disk formats, the download path (from a real HTTP server on 127.0.0.1), and
clear errors for missing, truncated and corrupt files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import math
import socket
import struct
import tarfile
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_pl.data.cifar import CIFAR10, CIFAR100, CifarSource, CifarVariant, parse_cifar_binary
from cifar_pl.data.fashion_mnist import SYSTEM_DIR, FashionMNISTSource, read_idx
from cifar_pl.errors import DatasetError
from tests.helpers import cifar_records, idx_bytes, write_cifar10, write_fashion_mnist

# --- CIFAR ----------------------------------------------------------------------------------------


def test_cifar10_binary_parses_to_the_written_images_and_labels(tmp_path):
    written = write_cifar10(tmp_path, per_file=20, test_count=30)
    arrays = CifarSource(CIFAR10).load(tmp_path)
    assert arrays.train_images.shape == (100, 3, 32, 32) and arrays.train_images.dtype == torch.uint8
    assert arrays.test_images.shape == (30, 3, 32, 32)
    np.testing.assert_array_equal(arrays.train_images.numpy(), written["train_images"])
    np.testing.assert_array_equal(arrays.train_labels.numpy(), written["train_labels"])
    np.testing.assert_array_equal(arrays.test_images.numpy(), written["test_images"])
    np.testing.assert_array_equal(arrays.test_labels.numpy(), written["test_labels"])
    assert arrays.classes[0] == "airplane" and arrays.num_classes == 10


def test_cifar_pixels_are_channel_major(tmp_path):
    """The first 1024 pixel bytes of a record are the red plane, row by row."""
    record = bytes([7]) + bytes(range(256)) * 12  # label 7, then 3072 bytes
    path = tmp_path / "one.bin"
    path.write_bytes(record)
    images, labels = parse_cifar_binary(path, CIFAR10)
    assert labels.tolist() == [7]
    assert images[0, 0, 0, :5].tolist() == [0, 1, 2, 3, 4]  # red, row 0
    assert images[0, 1, 0, 0].item() == (1024 % 256)  # green plane starts at byte 1024


def test_cifar100_uses_the_fine_label(tmp_path):
    raw, images, fine = cifar_records(12, label_bytes=2, num_classes=100, seed=3)
    path = tmp_path / "train.bin"
    path.write_bytes(raw)
    parsed_images, parsed_labels = parse_cifar_binary(path, CIFAR100)
    np.testing.assert_array_equal(parsed_labels.numpy(), fine)
    np.testing.assert_array_equal(parsed_images.numpy(), images)


def test_truncated_cifar_file_is_a_clear_error(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin.*truncated or corrupt.*Delete"):
        CifarSource(CIFAR10).load(tmp_path)


def test_cifar_label_out_of_range_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes([42]) + bytes(3072))
    with pytest.raises(DatasetError, match=r"label 42.*only 10 classes"):
        parse_cifar_binary(path, CIFAR10)


def test_missing_cifar_without_download_names_the_path(tmp_path):
    with pytest.raises(DatasetError) as info:
        CifarSource(CIFAR10).prepare(tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-bin") in message
    assert CIFAR10.url in message and "data.root" in message


# --- the download path, against a real HTTP server on 127.0.0.1 ------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; under /cut/, a transfer that breaks off: a chunked body whose first chunk never ends."""

    def do_GET(self) -> None:
        if self.path.startswith("/cut/"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"1000\r\n" + bytes(100))
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server(tmp_path):
    """Serve ``tmp_path / 'www'`` over HTTP on 127.0.0.1; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_Handler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _cifar10_archive(tmp_path: Path) -> bytes:
    written_root = tmp_path / "staging"
    write_cifar10(written_root, per_file=4, test_count=6)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(written_root / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    return buffer.getvalue()


def _variant_at(url: str, md5: str) -> CifarVariant:
    fields = {f: getattr(CIFAR10, f) for f in CIFAR10.__dataclass_fields__}
    return CifarVariant(**{**fields, "url": url, "md5": md5})


def test_download_verifies_md5_then_extracts_and_parses(tmp_path, http_server):
    www, base = http_server
    archive = _cifar10_archive(tmp_path)
    (www / "cifar-10-binary.tar.gz").write_bytes(archive)
    variant = _variant_at(f"{base}/cifar-10-binary.tar.gz", hashlib.md5(archive).hexdigest())
    root = tmp_path / "data"
    CifarSource(variant).prepare(root, download=True)
    assert (root / "cifar-10-binary.tar.gz").read_bytes() == archive
    arrays = CifarSource(variant).load(root)
    assert arrays.train_images.shape == (20, 3, 32, 32) and arrays.test_images.shape == (6, 3, 32, 32)


def test_download_with_wrong_md5_is_refused_and_removed(tmp_path, http_server):
    www, base = http_server
    (www / "cifar-10-binary.tar.gz").write_bytes(_cifar10_archive(tmp_path))
    variant = _variant_at(f"{base}/cifar-10-binary.tar.gz", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        CifarSource(variant).prepare(root, download=True)
    assert not (root / "cifar-10-binary.tar.gz").exists(), "a corrupt download must not be left behind"


def test_unreachable_server_names_url_and_path(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz"
    with pytest.raises(DatasetError) as info:
        CifarSource(_variant_at(url, CIFAR10.md5)).prepare(tmp_path / "data", download=True)
    message = str(info.value)
    assert url in message and str(tmp_path / "data") in message and "download failed" in message


# --- Fashion-MNIST ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_parses_and_pads_to_32(tmp_path, gz):
    written = write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train=40, test=20, gz=gz)
    arrays = FashionMNISTSource(system_dir=tmp_path / "absent", verify_checksums=False).load(tmp_path / "data")
    assert arrays.train_images.shape == (40, 1, 32, 32) and arrays.test_images.shape == (20, 1, 32, 32)
    np.testing.assert_array_equal(arrays.train_images[:, 0, 2:30, 2:30].numpy(), written["train_images"])
    assert arrays.train_images[:, :, :2].sum() == 0 and arrays.train_images[:, :, :, 30:].sum() == 0
    np.testing.assert_array_equal(arrays.test_labels.numpy(), written["t10k_labels"])
    assert arrays.classes[-1] == "Ankle boot"


def test_fashion_mnist_is_found_in_the_system_folder(tmp_path):
    write_fashion_mnist(tmp_path / "system", train=10, test=5)
    arrays = FashionMNISTSource(system_dir=tmp_path / "system", verify_checksums=False).load(tmp_path / "empty-root")
    assert len(arrays.train_labels) == 10


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))[:-10])
    with pytest.raises(DatasetError, match=r"declares shape \(3, 28, 28\).*truncated, corrupt"):
        read_idx(path, (28, 28))


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DatasetError, match="truncated, corrupt"):
        read_idx(path, ())


def test_wrong_idx_magic_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + bytes(40))  # 0x0d = float data, not unsigned bytes
    with pytest.raises(DatasetError, match="IDX header"):
        read_idx(path, (28, 28))


def test_missing_fashion_mnist_without_download_names_both_places(tmp_path):
    with pytest.raises(DatasetError) as info:
        FashionMNISTSource(system_dir=tmp_path / "sys").prepare(tmp_path / "root", download=False)
    assert str(tmp_path / "root" / "fashion-mnist") in str(info.value)
    assert str(tmp_path / "sys") in str(info.value)


# --- bounded, checked reads: lying, oversized and damaged files ----------------------------------------


def _gzip_of_zeros(path: Path, header: bytes, zeros: int) -> None:
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(zeros // 2**20):
            f.write(bytes(2**20))


def test_a_gzip_bomb_is_refused_after_reading_only_what_its_header_declares(tmp_path):
    # the header declares 10 images (7,840 bytes); the stream inflates to 64 MB
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gzip_of_zeros(path, struct.pack(">HBBIII", 0, 8, 3, 10, 28, 28), 64 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"declares shape \(10, 28, 28\) \(7,840 bytes of data\) but holds more"):
            read_idx(path, (28, 28))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"read {peak:,} bytes at once"


def test_a_corrupt_deflate_stream_is_a_clear_error(tmp_path):
    data = bytearray(gzip.compress(idx_bytes(np.zeros(40, dtype=np.uint8)), mtime=0))
    data[10] ^= 0xFF  # the first byte of the deflate stream: an invalid block type, a zlib.error
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"cannot be read \(error: Error -3 while decompressing data"):
        read_idx(path, ())


@pytest.mark.parametrize(
    ("dims", "problem"),
    [
        ((2**31, 2**31, 4), r"declares shape \(2147483648, 2147483648, 4\)"),  # np.prod overflows to 0 on this
        (
            (50, 3, 3),
            r"declares shape \(50, 3, 3\), but a Fashion-MNIST file holds at most 60,000 items of shape \(28, 28\)",
        ),
    ],
)
def test_an_idx_header_that_lies_about_its_shape_is_a_clear_error(tmp_path, dims, problem):
    folder = tmp_path / "data" / "fashion-mnist"
    write_fashion_mnist(folder, train=10, test=5, gz=False)
    data = bytes(math.prod(dims)) if math.prod(dims) < 2**20 else b""
    (folder / "train-images-idx3-ubyte").write_bytes(struct.pack(">HBBIII", 0, 8, 3, *dims) + data)
    with pytest.raises(DatasetError, match=problem):
        FashionMNISTSource(system_dir=tmp_path / "absent", verify_checksums=False).load(tmp_path / "data")


def test_a_cifar_file_larger_than_the_genuine_one_is_refused(tmp_path):
    write_cifar10(tmp_path)
    raw, _, _ = cifar_records(10_001, 1, 10, seed=5)  # the genuine files hold 10,000 images each
    (tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin").write_bytes(raw)
    with pytest.raises(DatasetError, match=r"data_batch_4\.bin is larger than the 30,730,000 bytes \(10,000 images\)"):
        CifarSource(CIFAR10).load(tmp_path)


def test_fashion_mnist_files_that_only_follow_the_format_fail_the_published_checksums(tmp_path):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train=10, test=5)
    with pytest.raises(
        DatasetError, match=r"train-images-idx3-ubyte.gz is not the published file.*verify_checksums=false"
    ):
        FashionMNISTSource(system_dir=tmp_path / "absent").load(tmp_path / "data")


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_genuine_fashion_mnist_files_pass_the_published_checksums(tmp_path):
    arrays = FashionMNISTSource().load(tmp_path / "empty-root")
    assert arrays.train_images.shape == (60_000, 1, 32, 32) and arrays.test_labels.shape == (10_000,)


def test_a_damaged_cifar_file_fails_the_checksums_recorded_at_extraction(tmp_path, http_server):
    www, base = http_server
    archive = _cifar10_archive(tmp_path)
    (www / "cifar-10-binary.tar.gz").write_bytes(archive)
    variant = _variant_at(f"{base}/cifar-10-binary.tar.gz", hashlib.md5(archive).hexdigest())
    root = tmp_path / "data"
    CifarSource(variant).prepare(root, download=True)
    folder = root / "cifar-10-batches-bin"
    assert "data_batch_2.bin" in (folder / "cifar_pl.md5").read_text()
    CifarSource(variant).load(root)
    batch = folder / "data_batch_2.bin"
    damaged = bytearray(batch.read_bytes())
    damaged[5] ^= 1  # one pixel, one bit: the length and the labels stay valid
    batch.write_bytes(bytes(damaged))
    with pytest.raises(DatasetError, match=r"data_batch_2\.bin differs from the file extracted from the verified"):
        CifarSource(variant).load(root)
    # extracted by hand (no record of the checksums): they are read from the verified archive beside it
    (folder / "cifar_pl.md5").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_2\.bin differs"):
        CifarSource(variant).load(root)


def test_a_download_that_breaks_off_is_a_clear_error_and_leaves_nothing_behind(tmp_path, http_server):
    _, base = http_server
    target = tmp_path / "data" / "fashion-mnist"
    with pytest.raises(DatasetError, match=r"The download failed: IncompleteRead"):
        FashionMNISTSource(system_dir=tmp_path / "absent", mirror=f"{base}/cut/").prepare(
            tmp_path / "data", download=True
        )
    assert list(target.iterdir()) == [], "no partial file for the next run to take for the dataset"
