"""Image files in and out of the model's format: read, orient, frame, resize.

Pillow reads the file (PNG, JPEG, anything it knows); everything after is NumPy on float32
pixels in [0, 1], laid out (C, H, W) like the model's input.

Grey data sets of drawings (MNIST and its kin) have a convention an arbitrary picture does
not follow: light ink on a dark background, the ink filling a fixed share of the frame
(MNIST's digits are scaled to 20 of the 28 pixels and centred). ``ink_profile`` measures that
convention on the training images; ``fit_to_profile`` brings a new picture to it, so that a
digit drawn dark on white paper, photographed anywhere in the frame, looks to the model like
the digits it was trained on.
"""

import numpy as np

from nbcnn.errors import DataError, describe


class ImageError(DataError):
    """An image file that cannot be read or used."""


def read_image(path, channels):
    """The image at ``path`` as float32 (channels, H, W) in [0, 1]; ``channels`` is 1 (grey) or 3 (RGB).

    A transparent image is laid on white first, as a viewer shows it (a drawing app's digit on a
    transparent canvas would otherwise be black on black)."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"images have 1 (grey) or 3 (RGB) channels, the model takes {channels}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            img = img.convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: cannot be read as an image ({describe(exc)})") from None
    if pixels.size == 0:
        raise ImageError(f"{path}: the image is empty")
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _ring(side):
    """Width of the border ring judged as background: a tenth of the shorter side, at least 1 pixel."""
    return max(1, side // 10)


def border_and_centre(grey):
    """Mean brightness of the border ring and of the central half of a (H, W) image."""
    h, w = grey.shape
    r = _ring(min(h, w))
    mask = np.ones((h, w), bool)
    mask[r:h - r, r:w - r] = False
    border = float(grey[mask].mean()) if mask.any() else float(grey.mean())
    centre = grey[h // 4: h - h // 4, w // 4: w - w // 4]
    return border, float(centre.mean()) if centre.size else float(grey.mean())


def ink_is_light(grey):
    """True when the picture's ink is lighter than its background (judged border against centre)."""
    border, centre = border_and_centre(grey)
    return centre >= border


def ink_box(grey, share=0.25):
    """(top, bottom, left, right) of the pixels that differ from the background by more than
    ``share`` of the largest difference; None for a blank picture."""
    border, _ = border_and_centre(grey)
    ink = np.abs(grey - border)
    peak = float(ink.max())
    if peak < 0.1:  # nothing stands out from the background by a tenth of the range
        return None
    rows = np.flatnonzero((ink > share * peak).any(axis=1))
    cols = np.flatnonzero((ink > share * peak).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _centre_of_mass(grey, background):
    """(row, column) of the ink's centre of mass; the frame's centre for a blank picture."""
    weight = np.abs(grey - background)
    total = float(weight.sum())
    h, w = grey.shape
    if total <= 0:
        return (h - 1) / 2, (w - 1) / 2
    return (float((weight.sum(axis=1) * np.arange(h)).sum()) / total,
            float((weight.sum(axis=0) * np.arange(w)).sum()) / total)


def framing(grey):
    """(extent, offset) of a grey picture's ink: the share of the side its bounding box spans, and
    how far its centre of mass sits from the frame's centre, as a share of the side; None for a
    blank picture."""
    box = ink_box(grey)
    if box is None:
        return None
    side = max(grey.shape)
    cy, cx = _centre_of_mass(grey, border_and_centre(grey)[0])
    offset = max(abs(cy - (grey.shape[0] - 1) / 2), abs(cx - (grey.shape[1] - 1) / 2)) / side
    return max(box[1] - box[0], box[3] - box[2]) / side, offset


def ink_profile(images, sample=1000):
    """The convention of a grey data set (uint8 (N, H, W)), as JSON values kept in the checkpoint:
    ``ink`` "light" or "dark"; ``ink_extent``, the median share of the side its ink's bounding box
    spans; ``centred``, whether the ink's centre of mass sits within a tenth of the side of the
    frame's centre (in the median image): only then does framing a new picture the same way help."""
    step = max(1, images.shape[0] // sample)
    picked = np.asarray(images[::step][:sample], np.float32) / np.float32(255.0)
    light, extents, offsets = [], [], []
    for g in picked:
        light.append(ink_is_light(g))
        measured = framing(g)
        if measured is not None:
            extents.append(measured[0])
            offsets.append(measured[1])
    return {"ink": "light" if np.mean(light) >= 0.5 else "dark",
            "ink_extent": float(np.median(extents)) if extents else 1.0,
            "centred": bool(offsets) and float(np.median(offsets)) < 0.1}


def resize(pixels, size):
    """(C, H, W) -> (C, size[0], size[1]) (an int: square), each channel resampled with Lanczos
    filtering (antialiased)."""
    from PIL import Image

    h, w = (size, size) if np.ndim(size) == 0 else size
    if pixels.shape[1:] == (h, w):
        return pixels
    out = np.empty((pixels.shape[0], h, w), np.float32)
    for c in range(pixels.shape[0]):
        img = Image.fromarray(np.ascontiguousarray(pixels[c]), mode="F")
        out[c] = np.asarray(img.resize((w, h), Image.Resampling.LANCZOS))
    return np.clip(out, 0.0, 1.0, out=out)


def pad_square(pixels, value, side=None):
    """Centre (C, H, W) on a square canvas of ``side`` (default the longer side) filled with ``value`` per channel."""
    c, h, w = pixels.shape
    side = max(h, w) if side is None else side
    canvas = np.empty((c, side, side), np.float32)
    canvas[:] = np.asarray(value, np.float32).reshape(-1, 1, 1)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, top:top + h, left:left + w] = pixels
    return canvas


# How close a picture's framing must be to the training data's to be left as it is: its ink's
# extent within this share of the side of the data's, its centre of mass within this share of the
# side of the frame's centre. MNIST's own test images: extents 0.68-0.71 of the side against the
# data's 0.71, centres at most 0.036 of the side off.
FRAMED_EXTENT = 0.1
FRAMED_OFFSET = 0.08


def in_training_format(grey, size, profile):
    """Whether a grey picture (H, W) already looks like the training images of ``profile``: the
    model's size, the ink the same way round and, where the training data's ink is centred, about
    the same share of the frame and about centred. Such a picture is given to the model as it is:
    framing it again would only move it off the training data's pixel grid."""
    if grey.shape != (size, size) or ink_is_light(grey) != (profile.get("ink", "light") == "light"):
        return False
    measured = framing(grey) if profile.get("centred", False) else None
    if measured is None:  # a blank picture, or data whose ink is not framed in any one way
        return True
    extent, offset = measured
    return abs(extent - float(profile.get("ink_extent", 1.0))) <= FRAMED_EXTENT and offset <= FRAMED_OFFSET


def fit_to_profile(pixels, size, profile=None):
    """(C, H, W) in [0, 1] -> (C, size, size) for a model trained on images of ``profile``.

    A picture already of that size is left as it is when nothing says it differs from the training
    data (colour, or no profile), or when it is in the training format (``in_training_format``).
    Otherwise, without a profile (colour data, or a checkpoint that has none): padded to a square
    with the border's colour and resized. With one (grey drawings): inverted when its ink is the
    other way round from the training data's; then, when the training data's ink is centred
    (MNIST's is), cropped to the ink and framed so that it spans the share of the side the training
    data's did, centred on its centre of mass; otherwise padded and resized."""
    if profile is None or pixels.shape[0] != 1:
        if pixels.shape[1:] == (size, size):
            return pixels
        border = np.median(np.concatenate([pixels[:, 0, :], pixels[:, -1, :], pixels[:, :, 0], pixels[:, :, -1]],
                                          axis=1), axis=1)
        return resize(pad_square(pixels, border), size)
    if in_training_format(pixels[0], size, profile):
        return pixels
    return frame_like_training_data(pixels[0], size, profile)


def frame_like_training_data(grey, size, profile):
    """A grey picture (H, W) -> (1, size, size) framed as the training images of ``profile`` were:
    inverted when its ink is the other way round; then, when the training data's ink is centred,
    the ink cropped, scaled to the share of the side the training data's spans and centred on its
    centre of mass; otherwise padded to a square and resized."""
    if ink_is_light(grey) != (profile.get("ink", "light") == "light"):
        grey = 1.0 - grey
    background = border_and_centre(grey)[0]
    box = ink_box(grey)
    if box is None or not profile.get("centred", False):  # a blank picture: nothing to frame
        return resize(pad_square(grey[None], background), size)
    # As MNIST was made: the ink's box scaled to the data's share of the side (aspect kept), then
    # placed so that the ink's centre of mass is the frame's centre.
    top, bottom, left, right = box
    ink = grey[top:bottom, left:right]
    extent = min(max(float(profile.get("ink_extent", 1.0)), 0.05), 1.0)
    scale = extent * size / max(ink.shape)
    h, w = (max(1, min(size, int(round(d * scale)))) for d in ink.shape)
    ink = resize(ink[None], (h, w))[0]
    cy, cx = _centre_of_mass(ink, background)
    top = min(max(int(round((size - 1) / 2 - cy)), 0), size - h)
    left = min(max(int(round((size - 1) / 2 - cx)), 0), size - w)
    out = np.full((1, size, size), background, np.float32)
    out[0, top:top + h, left:left + w] = ink
    return out
