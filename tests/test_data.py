"""The embedded digits and the image-folder loader: values, labels, indices, fingerprints, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddm import UsageError
from ddm.data import load_dataset
from ddm.data.images import DigitsDataset, ImageFolderDataset


def write_image(path, color, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_digits_scaled_labelled_and_fingerprinted():
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.images.shape == (1797, 1, 8, 8)
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert set(ds.labels.tolist()) == set(range(10))
    image, label, index = ds[5]
    assert torch.equal(image, ds.images[5]) and label == int(ds.labels[5]) and index == 5
    assert DigitsDataset().fingerprint == ds.fingerprint


def test_image_folder_classes_resize_crop_and_fingerprint(tmp_path):
    write_image(tmp_path / "cat" / "a.png", (255, 0, 0))
    write_image(tmp_path / "cat" / "b.jpg", (0, 255, 0))
    write_image(tmp_path / "dog" / "c.png", (0, 0, 255))
    ds = ImageFolderDataset(tmp_path, image_size=4)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    image, label, index = ds[2]
    assert image.shape == (3, 4, 4) and label == 1 and index == 2
    assert np.allclose(image[2].numpy(), 1.0, atol=0.02) and np.allclose(image[0].numpy(), -1.0, atol=0.02)
    before = ds.fingerprint
    assert ImageFolderDataset(tmp_path, image_size=4).fingerprint == before
    assert ImageFolderDataset(tmp_path, image_size=8).fingerprint != before  # size is part of the identity
    write_image(tmp_path / "dog" / "d.png", (9, 9, 9))
    assert ImageFolderDataset(tmp_path, image_size=4).fingerprint != before


def test_flat_folder_is_unlabelled(tmp_path):
    write_image(tmp_path / "x.png", (1, 2, 3))
    ds = load_dataset(str(tmp_path), image_size=8)
    assert ds.num_classes == 0 and ds.labels.tolist() == [-1]


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "empty"),
    (lambda p: (p / "notes.txt").write_text("no images"), "empty"),
])
def test_empty_folder_is_a_usage_error(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(UsageError, match=match):
        ImageFolderDataset(tmp_path, image_size=8)


def test_missing_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"), image_size=8)
