"""The one image layer (images.py): one fit vocabulary for PIL images and tensors, the old node names as aliases, one
centre-crop box, and the front ends (CLI, nodes, evaluation, demo, training data) fitting through it."""
import numpy as np
import PIL.Image
import pytest
import torch

from flextok_kit import images
from flextok_kit.images import FITS, center_box, cover_size, fit_image, fit_mode, fit_plan, fit_tensor, load_batch


def pattern(w: int, h: int) -> PIL.Image.Image:
    """A smooth RGB picture with a different colour in each direction, so a shifted crop shows."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), (np.sin(x / 7) * np.cos(y / 5) + 1) / 2], -1) * 255
    return PIL.Image.fromarray(arr.round().astype(np.uint8))


def as_tensor01(im: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def test_one_vocabulary_and_the_old_node_names():
    assert FITS == ("center-crop", "resize", "none")
    assert [fit_mode(f) for f in FITS] == list(FITS)
    assert fit_mode("center_crop") == "center-crop" and fit_mode("stretch") == "resize"
    for bad in ("squash", "center", "", None):
        with pytest.raises(ValueError, match="fit must be one of center-crop, resize, none"):
            fit_mode(bad)


def test_center_box_and_cover_size():
    assert center_box(160, 96, 96, 96) == (32, 0, 128, 96)
    assert center_box(5, 4, 2, 2) == (1, 1, 3, 3)          # odd margins: the extra pixel goes right / below
    assert center_box(64, 64, 64, 64) == (0, 0, 64, 64)
    assert cover_size(160, 96, 128, 128) == (213, 128)      # short side to the target, aspect kept
    assert cover_size(96, 160, 128, 128) == (128, 213)
    assert cover_size(160, 96, 128, 96) == (160, 96)       # already covers a (96, 128) target exactly
    assert cover_size(300, 300, 128, 96) == (128, 128)     # a non-square target: the larger scale wins
    # fit_plan: (resize_to, box in the resized image); None where a step does nothing
    assert fit_plan(160, 96, 128, "center-crop") == ((213, 128), (42, 0, 170, 128))
    assert fit_plan(128, 200, 128, "center-crop") == (None, (0, 36, 128, 164))
    assert fit_plan(160, 96, (96, 128), "center-crop") == (None, (16, 0, 144, 96))
    assert fit_plan(160, 96, 128, "resize") == ((128, 128), None)
    assert fit_plan(160, 96, 128, "none") == (None, None)
    assert fit_plan(128, 128, 128, "stretch") == (None, None)
    assert images.fitted_size(160, 96, 128, "center-crop") == (128, 128)
    assert images.fitted_size(160, 96, (64, 128), "resize") == (128, 64)
    assert images.fitted_size(160, 96, 128, "none") == (160, 96)


@pytest.mark.parametrize("w,h", [(128, 200), (200, 128), (128, 129)])
def test_pil_and_tensor_crop_the_same_pixels_when_no_resize(w, h):
    im = pattern(w, h)
    pil = as_tensor01(fit_image(im, 128, "center-crop"))
    ten = fit_tensor(as_tensor01(im), 128, "center-crop")
    assert pil.shape == ten.shape == (1, 3, 128, 128)
    assert torch.equal(pil, ten)
    x0, y0, x1, y1 = center_box(w, h, 128, 128)
    assert torch.equal(ten, as_tensor01(im)[:, :, y0:y1, x0:x1])


@pytest.mark.parametrize("w,h,size,fit", [(160, 96, 64, "center-crop"), (96, 160, 64, "center-crop"),
                                          (77, 33, 32, "center-crop"), (160, 96, 64, "resize")])
def test_pil_and_tensor_paths_agree_on_the_box(w, h, size, fit):
    """Each front end keeps its resampling (PIL bicubic in the CLI, antialiased torch bicubic in the nodes), so the
    pixels differ a little; the box is the same: a crop one pixel off would differ far more on this pattern."""
    im = pattern(w, h)
    pil = as_tensor01(fit_image(im, size, fit))
    ten = fit_tensor(as_tensor01(im), size, fit)
    assert pil.shape == ten.shape == (1, 3, size, size)
    err = (pil - ten).abs().mean()
    assert err < 0.004, float(err)
    if fit == "center-crop":
        (nw, nh), (x0, y0, _, _) = fit_plan(w, h, size, fit)
        dx, dy = (1, 0) if nw > size else (0, 1)
        shifted = as_tensor01(im.resize((nw, nh), PIL.Image.BICUBIC).crop((x0 + dx, y0 + dy, x0 + dx + size,
                                                                             y0 + dy + size)))
        assert (shifted - ten).abs().mean() > 5 * err


def test_fit_none_and_exact_size_leave_the_image_alone():
    im = pattern(96, 160)
    assert fit_image(im, 128, "none") is im
    assert fit_image(pattern(64, 64), 64, "center-crop").tobytes() == pattern(64, 64).tobytes()
    x = torch.rand(2, 3, 96, 160)
    assert fit_tensor(x, 128, "none") is x
    assert fit_tensor(x, (96, 160), "resize") is x and fit_tensor(x, (96, 160), "center-crop") is x


def test_load_batch_and_the_front_ends_share_the_fit(tmp_path):
    from flextok_kit import demo
    from flextok_kit.nodes import core

    pattern(160, 96).save(tmp_path / "a.png")
    pattern(96, 160).save(tmp_path / "b.png")
    batch = load_batch([tmp_path], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.is_contiguous()
    expected = images.to_tensor([fit_image(images.load_image(tmp_path / f"{n}.png"), 64, "center-crop") for n in "ab"])
    assert torch.equal(batch, expected)
    assert torch.equal(load_batch([tmp_path], 64, "resize", limit=1),
                       images.to_tensor([images.load_image(tmp_path / "a.png").resize((64, 64), PIL.Image.BICUBIC)]))
    with pytest.raises(ValueError, match="several sizes"):
        load_batch([tmp_path], 64, "none")
    assert torch.equal(demo.load_images([str(tmp_path)], 64)[0], batch)
    # the node adapter: IMAGE [B,H,W,C] -> the tensor fit
    image = torch.rand(1, 96, 160, 4)
    assert torch.equal(core.fit_images(image, (64, 64), "center_crop"),
                       fit_tensor(image[..., :3].movedim(-1, 1), 64, "center-crop"))


def test_training_centre_crop_uses_the_same_box():
    """The training data resamples the centre square straight to the size (one resample, JPEG draft), the front ends
    scale first and then crop: with the short side at the size both are the same pixels."""
    from flextok_kit.training.data import ImageTransform

    for w, h in [(64, 100), (100, 64), (64, 65)]:
        im = pattern(w, h)
        got = ImageTransform(64, crop="center", hflip=0.0)(im, np.random.default_rng(0))
        want = torch.from_numpy(np.asarray(fit_image(im, 64, "center-crop")).copy()).permute(2, 0, 1)
        assert torch.equal(got, want)
