"""`--limit` draws its images at random: data sets sorted by class must not give one class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import InputSpec
from training.data import DataError, limited, limited_indices, load_images

SPEC = InputSpec(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def sorted_by_class(tmp_path: Path) -> Path:
    """Five classes of 100 images, class after class (as ../shared/data's files are); each image's
    pixels hold its own index, so a drawn image can be traced back."""
    index = np.arange(500)
    x = np.broadcast_to((index % 251).astype(np.uint8)[:, None, None, None], (500, 8, 8, 3)).copy()
    path = tmp_path / "sorted.npz"
    np.savez(path, x=x, y=index // 100)
    return path


def test_a_limit_draws_from_every_class_not_the_first_images(sorted_by_class: Path) -> None:
    images, labels = load_images(str(sorted_by_class), SPEC, limit=100)
    assert len(images) == 100 and set(labels.tolist()) == {0, 1, 2, 3, 4}
    assert np.all(np.diff(labels) >= 0)  # kept in source order
    again, labels_again = load_images(str(sorted_by_class), SPEC, limit=100)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)  # the same draw


def test_the_draw_is_fixed_and_a_larger_limit_keeps_everything() -> None:
    drawn = limited_indices(1000, 10)
    assert np.array_equal(drawn, limited_indices(1000, 10)) and len(set(drawn.tolist())) == 10
    assert not np.array_equal(drawn, np.arange(10))
    assert np.array_equal(limited_indices(7, 50), np.arange(7))
    assert np.array_equal(limited_indices(7, None), np.arange(7))
    with pytest.raises(DataError, match="positive --limit"):
        limited_indices(7, 0)


def test_a_limited_source_is_named_as_drawn() -> None:
    assert limited("cifar10_test", None) == "cifar10_test"
    assert limited("cifar10_test", 1000) == "cifar10_test (1000 drawn at random, seed 0)"


def test_the_demo_sets_are_disjoint_random_draws_over_every_class() -> None:
    from lab.demo import CALIBRATION_IMAGES, FIT_IMAGES, SHADOW_IMAGES, demo_splits

    train_y, test_y = np.repeat(np.arange(10), 1700), np.repeat(np.arange(10), 1000)  # sorted by class
    splits = demo_splits(len(train_y), len(test_y))
    assert (len(splits["shadow"]), len(splits["fit"])) == (SHADOW_IMAGES, FIT_IMAGES)
    assert len(splits["calibration"]) == CALIBRATION_IMAGES
    assert not set(splits["shadow"].tolist()) & set(splits["fit"].tolist())
    assert not set(splits["calibration"].tolist()) & set(splits["evaluation"].tolist())
    assert len(splits["calibration"]) + len(splits["evaluation"]) == len(test_y)
    for name, labels in (("shadow", train_y), ("fit", train_y), ("calibration", test_y)):
        counts = np.bincount(labels[splits[name]], minlength=10)
        assert counts.min() > 0.7 * counts.mean(), (name, counts)  # no class left out or dominant


def test_npz_labels_that_do_not_match_the_images_are_refused(tmp_path: Path) -> None:
    x = np.zeros((4, 8, 8, 3), np.uint8)
    for name, y in {
        "short": np.zeros(2, np.int64),
        "text": np.array(list("abcd")),
        "2d": np.zeros((4, 3)),
    }.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        with pytest.raises(DataError, match="expected integer labels \\[4\\], one per image"):
            load_images(str(tmp_path / f"{name}.npz"), SPEC)


def test_an_npz_declaring_a_shape_past_memory_is_refused_before_reading(tmp_path: Path) -> None:
    """numpy allocates the shape a .npy header declares before it reads the data: 273 TiB here."""
    import struct
    import zipfile

    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (100000000, 1000, 1000, 3), }"
    header += b" " * (127 - 10 - len(header)) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(64)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("x.npy", npy)
    with pytest.raises(DataError, match="declared shape does not fit in memory"):
        load_images(str(tmp_path / "huge.npz"), SPEC)


def test_an_image_folder_reaches_no_other_decoder_and_no_special_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EPS file named .png must never reach Pillow's EPS plugin (it runs Ghostscript on the file),
    and a FIFO named .png must not block the read forever: each is a one-line DataError."""
    import io
    import os
    import threading

    from PIL import EpsImagePlugin, Image

    def ghostscript(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ghostscript was run on a data file")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    buffer = io.BytesIO()
    Image.new("RGB", (9, 9)).save(buffer, "PNG")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(buffer.getvalue())
    (folder / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n")
    with pytest.raises(DataError, match="eps.png: .*not a JPEG, PNG, WebP or BMP image"):
        load_images(str(folder), SPEC)
    (folder / "eps.png").unlink()

    os.mkfifo(folder / "fifo.png")
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_images(str(folder), SPEC)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert outcome, "reading a FIFO named .png blocked"
    assert isinstance(outcome[0], DataError) and "fifo.png is not a regular file" in str(outcome[0])


def test_an_image_file_over_the_size_limit_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read holds the whole file in memory: an oversized file is a one-line DataError first."""
    import io
    import os

    from PIL import Image

    from models import bundle

    folder = tmp_path / "images"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (9, 9)).save(buffer, "PNG")
    (folder / "a_good.png").write_bytes(buffer.getvalue())
    with open(folder / "huge.png", "wb") as handle:  # sparse: nothing is written to disk
        handle.write(buffer.getvalue())
        os.truncate(handle.fileno(), bundle.MAX_IMAGE_FILE_BYTES + 1)
    reads: list[int] = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: reads.append(1) or real_fdopen(*a, **k))
    with pytest.raises(DataError, match=r"huge.png has 67,108,865 bytes, over the 67,108,864 \(64 MiB\)"):
        load_images(str(folder), SPEC)
    assert len(reads) == 1  # the good file was read; the huge one never opened for reading
    (folder / "huge.png").unlink()
    assert load_images(str(folder), SPEC)[0].shape == (1, 3, 8, 8)


def test_an_npz_of_images_without_pixels_is_refused(tmp_path: Path) -> None:
    """Resized to the encoder's input, a 0 x 0 image is all NaN: a fit on them ran with a NaN loss."""
    for shape in ((5, 0, 0, 3), (5, 32, 0, 3)):
        np.savez(tmp_path / "empty.npz", x=np.zeros(shape, np.uint8), y=np.zeros(5, np.int64))
        with pytest.raises(DataError, match="its images have no pixels"):
            load_images(str(tmp_path / "empty.npz"), SPEC)
