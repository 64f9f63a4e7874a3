import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import ImageTransform, load_training_data, read_metadata, read_prompts
from common.errors import InputError


def _folder(tmp_path, names, captions, column="prompt"):
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / name)
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for name, cap in zip(names, captions):
            f.write(json.dumps({"file_name": name, column: cap}) + "\n")
    return str(tmp_path)


def test_row_order_is_metadata_order_not_file_name_order(tmp_path):
    # File names sort the other way round from the metadata lines.
    names = ["z.png", "m.png", "a.png", "b.png"]
    caps = ["first", "second", "third", "fourth"]
    ds = load_training_data(_folder(tmp_path, names, caps), None, "prompt")
    assert ds["caption"] == caps
    red = [np.asarray(im)[0, 0, 0] for im in ds["image"]]
    assert red == [0, 20, 40, 60]


def test_missing_caption_column_names_the_flag(tmp_path):
    d = _folder(tmp_path, ["a.png"], ["x"], column="text")
    with pytest.raises(InputError, match="--caption_column 'prompt'"):
        read_metadata(d, "prompt")


def test_unreadable_and_missing_images(tmp_path):
    d = _folder(tmp_path, ["a.png", "b.png"], ["x", "y"])
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="unreadable image"):
        read_metadata(d, "prompt")
    (tmp_path / "b.png").unlink()
    with pytest.raises(InputError, match="does not exist"):
        read_metadata(d, "prompt")


def test_transform_center_crop_flip_and_range():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    x = ImageTransform(10, center_crop=True, random_flip=False)(img)
    assert x.shape == (3, 10, 10)
    assert x.min() >= -1 and x.max() <= 1
    # After resizing to 20x10 the centre crop covers columns 5..14: white on the left, black on the right.
    assert x[0, 5, 0] == pytest.approx(1.0) and x[0, 5, -1] == pytest.approx(-1.0)
    t = ImageTransform(10, center_crop=True, random_flip=True)
    assert t(img, flip=True)[0, 5, 0] == pytest.approx(-1.0) and t(img, flip=False)[0, 5, 0] == pytest.approx(1.0)
    assert torch.equal(ImageTransform(10, True, random_flip=False)(img, flip=True), x)  # flips only when enabled
    # Random crop at fractions of the free range: left edge, right edge.
    r = ImageTransform(10, center_crop=False, random_flip=False)
    assert r(img, crop=(0.0, 0.0))[0, 5, 0] == pytest.approx(1.0)
    assert r(img, crop=(0.999, 0.0))[0, 5, -1] == pytest.approx(-1.0)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("one\n\n  two  \n")
    assert read_prompts(str(p)) == ["one", "two"]
    p.write_text("\n \n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(str(p))
    with pytest.raises(InputError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
