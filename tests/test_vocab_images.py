"""The leaf modules firm.vocab and firm.images: one definition of the tasks, dimensions and score range; one image
decoder with the format whitelist and the pixel cap, used by shards and the critic server alike."""

import base64
import io
import json
import struct
import zlib

import pytest
import torch
from PIL import Image

from firm import images, vocab
from firm.vocab import Task


@pytest.mark.parametrize(
    "word, task",
    [("edit", Task.EDIT), ("gen", Task.GEN), ("generate", Task.GEN), ("Generation", Task.GEN), (" t2i ", Task.GEN)],
)
def test_task_parse_takes_every_spelling_in_use(word, task):
    assert Task.parse(word) is task
    assert Task.parse(task) is task


@pytest.mark.parametrize("bad", ["edits", "", None, 1, "img2img"])
def test_task_parse_refuses_other_words_and_names_the_accepted_ones(bad):
    with pytest.raises(ValueError, match="use 'edit' or 'gen'"):
        Task.parse(bad)


def test_task_is_its_word_on_disk():
    assert Task.EDIT == "edit" and Task.GEN == "gen" and f"{Task.GEN}" == "gen" and str(Task.EDIT) == "edit"
    assert json.dumps({"task": Task.EDIT}) == '{"task": "edit"}'
    assert (Task.EDIT.schema, Task.GEN.schema) == ("edit", "generation")
    assert Task.EDIT.dimensions == (vocab.EXECUTION, vocab.CONSISTENCY)
    assert Task.GEN.dimensions == (vocab.INSTRUCTION, vocab.QUALITY)
    assert vocab.DIMENSIONS == ("execution", "consistency", "instruction", "quality")


def test_every_family_declares_a_task_member():
    from firm.registry import REGISTRIES, resolve

    families = REGISTRIES["families"]
    assert len(families) >= 6
    for name in families:
        fam = resolve("families", name)
        assert isinstance(fam.task, Task), f"{name}: task {fam.task!r} is not a firm.vocab.Task"
    assert resolve("families", "qwen_image_edit").task is Task.EDIT and resolve("families", "sd3").task is Task.GEN


def test_configs_take_the_other_spellings_and_keep_the_canonical_word():
    from firm.algorithms.config import RLConfig
    from firm.data.prompts import PromptDataModule

    c = RLConfig(task="generation")
    c.validate()
    assert c.task == "gen" and type(c.task) is str
    d = PromptDataModule.Config(task="edit", prompts=["x"])
    d.validate()
    assert d.task == "edit"
    with pytest.raises(ValueError, match="unknown task 'edits'"):
        RLConfig(task="edits").validate()


# --------------------------------------------------------------------------------------------------------------------
# firm.images


def _png(size=(4, 3), color=(10, 20, 30)) -> bytes:
    return images.encode(Image.new("RGB", size, color))[1]


def test_encode_decode_round_trip_png_and_jpeg():
    img = Image.new("RGB", (8, 6), (200, 100, 50))
    ext, data = images.encode(img, "png")
    out = images.decode(data)
    assert ext == "png" and out.size == (8, 6) and out.getpixel((0, 0)) == (200, 100, 50)
    ext, data = images.encode(img, "jpeg")
    assert ext == "jpg" and images.decode(data).format == "JPEG"
    with pytest.raises(ValueError, match="alpha"):
        images.encode(Image.new("RGBA", (2, 2)), "jpg")
    with pytest.raises(ValueError, match="unknown image_format"):
        images.encode(img, "tiff")


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "ICO"])
def test_decode_refuses_formats_outside_the_whitelist_before_pillow_sees_them(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format=fmt)
    with pytest.raises(images.UnsupportedImageError, match="not PNG, JPEG or WEBP"):
        images.decode(buf.getvalue())
    with pytest.raises(images.UnsupportedImageError):
        images.decode(b"\x80\x04\x95 pickle bytes")


def test_the_pixel_cap_is_read_from_the_header_before_any_pixel_is_decoded():
    # A valid PNG header that claims 20000 x 20000 pixels with almost no data: decoding it would need 1.2 GB.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def claiming(w: int, h: int) -> bytes:
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")

    with pytest.raises(images.ImageTooLargeError, match=r"5000x5000 = 25000000 pixels; at most 16777216 are accepted"):
        images.decode(claiming(5000, 5000))
    with pytest.raises(images.ImageTooLargeError, match=r"400000000 pixels.*at most 16777216 are accepted"):
        images.decode(claiming(20000, 20000))  # past Pillow's own bomb limit too: still our error
    with pytest.raises(images.ImageTooLargeError, match=r"at most 11 are accepted \(--limit\)"):
        images.decode(_png(), max_pixels=11, limit_name="--limit")
    assert images.decode(_png(), max_pixels=12).size == (4, 3)


def test_data_urls_decode_back_to_the_image():
    img = Image.new("RGB", (5, 7), (1, 2, 3))
    url = images.to_data_url(img)
    assert url.startswith("data:image/png;base64,")
    assert images.decode(base64.b64decode(url.split(",", 1)[1])).getpixel((4, 6)) == (1, 2, 3)
    assert images.to_data_url(img, "jpg").startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError, match="unknown"):
        images.to_data_url(img, "bmp")


def test_fit_pixels_keeps_the_aspect_ratio_and_converts_to_rgb():
    out = images.fit_pixels(Image.new("L", (400, 100)), max_pixels=10_000)
    assert out.mode == "RGB" and out.size == (200, 50)
    small = Image.new("RGB", (10, 10))
    assert images.fit_pixels(small, max_pixels=10_000) is small
    with pytest.raises(TypeError, match="source must be a PIL.Image.Image, got ndarray"):
        import numpy as np

        images.fit_pixels(np.zeros((2, 2)), what="source")


def test_tensor_conversions_round_trip_8_bit_images():
    x = torch.rand(2, 3, 6, 5)
    pil = images.to_pil(x)
    assert [p.size for p in pil] == [(5, 6), (5, 6)]
    back = images.to_tensor(pil, (5, 6))
    assert back.shape == (2, 3, 6, 5) and torch.allclose(back, x, atol=1 / 255)
