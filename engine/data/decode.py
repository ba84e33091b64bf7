"""Encoded image bytes -> augmented uint8 pixels [C, S, S]: the CPU half of the image input pipeline.

Workers stop at uint8: the float conversion, normalisation and horizontal flip happen on the training device
(`normalise_batch`), so the host does a quarter of the memory traffic and none of the arithmetic.

Decoders (`data.decoder`):
- "turbojpeg": JPEGs through libjpeg-turbo's own API (the `simplejpeg` package), at reduced scale (1/2, 1/4,
  1/8, decoded inside the codec) where the crop, once resized, needs fewer pixels; resizing with OpenCV when it
  is installed (much faster than PIL's on uint8). Other formats, and JPEGs it refuses (e.g. CMYK), go to PIL.
- "pil": Pillow for everything (its JPEG `draft` mode gives the same reduced-scale decode), PIL's resize: the
  pixels of the original float pipeline exactly, wherever the crop is too small for a reduced-scale decode.
- "auto": "turbojpeg" where simplejpeg is installed, else "pil".

Every random choice is drawn by the caller's numpy generator in a fixed order (crop box, then flip), so the
decoder changes pixels (within JPEG tolerance) but never which crop a sample gets.
"""
from __future__ import annotations

import importlib.util
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

DECODERS = ("auto", "pil", "turbojpeg")   # GPU decoding (nvJPEG / DALI) is not implemented
JPEG_MAGIC = b"\xff\xd8\xff"
EVAL_RESIZE_RATIO = 8 / 7  # resize the shorter side to 256 for a 224 crop, as the usual ImageNet evaluation
SHRINK_FOR_AREA = 2.0      # OpenCV: box-filter (INTER_AREA) from this shrink on, bicubic below (no aliasing)
INSTALL_HINT = {"turbojpeg": "pip install simplejpeg (or pip install 'sslpt[fast-data]')"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_decoder(name: str) -> str:
    """The decoder to use for `data.decoder = name` ("auto" resolved); a clear error if it cannot be used."""
    if name not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(map(repr, DECODERS))}; got {name!r}")
    if name == "auto":
        return "turbojpeg" if _installed("simplejpeg") else "pil"
    if name == "turbojpeg" and not _installed("simplejpeg"):
        raise ValueError(f"data.decoder = 'turbojpeg' needs the simplejpeg package: {INSTALL_HINT['turbojpeg']}; "
                         f"or set data.decoder = 'pil'")
    return name


def to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer images as 8-bit "L", scaled by their bit depth (PIL's convert clips at 255)."""
    if img.mode.startswith("I;16"):
        bits = 16
    elif img.mode == "I":
        bits = 16 if img.getextrema()[1] < 2 ** 16 else 32   # PNG/TIFF 16-bit data often opens as "I"
    else:
        return img
    pixels = np.asarray(img).astype(np.float64)
    scaled = np.clip(pixels, 0, 2 ** bits - 1) * (255 / (2 ** bits - 1))
    return Image.fromarray((scaled + 0.5).astype(np.uint8), "L")


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _cv2():
    """OpenCV if installed (single-threaded: the DataLoader workers are the parallelism), else None."""
    if not hasattr(_cv2, "module"):
        _cv2.module = None
        if _installed("cv2"):
            import cv2

            cv2.setNumThreads(1)
            _cv2.module = cv2
    return _cv2.module


class ImageDecoder:
    """Decodes and transforms one image's bytes; picklable (DataLoader workers get a copy).

    Args:
        img_size: output side S.
        channels: 3 (RGB) or 1 (grayscale).
        decoder: a `data.decoder` value.
        max_image_pixels: images with more pixels are refused (decompression bombs), before any decoding.
    """

    def __init__(self, img_size: int, channels: int, decoder: str = "auto", max_image_pixels: int = 89_478_485):
        self.img_size, self.channels = img_size, channels
        self.decoder = resolve_decoder(decoder)
        self.max_image_pixels = max_image_pixels

    # ------------------------------------------------------------------ decoding
    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_image_pixels:
            raise ValueError(f"{width} x {height} pixels exceed data.max_image_pixels={self.max_image_pixels}")

    def size(self, data: bytes) -> tuple[int, int]:
        """(height, width) from the header only."""
        if self.decoder == "turbojpeg" and data.startswith(JPEG_MAGIC):
            import simplejpeg

            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                return height, width
            except ValueError:
                pass   # PIL may still read it (decode() falls back the same way)
        with self._open(data) as img:
            return img.height, img.width

    def _open(self, data: bytes) -> Image.Image:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the limit below is the one used
            if Image.MAX_IMAGE_PIXELS is not None and self.max_image_pixels > 2 * Image.MAX_IMAGE_PIXELS:
                Image.MAX_IMAGE_PIXELS = self.max_image_pixels // 2 + 1   # PIL refuses above twice its cap
            img = Image.open(io.BytesIO(data))
        self._check_pixels(img.width, img.height)
        return img

    def decode(self, data: bytes, min_height: int = 0, min_width: int = 0) -> np.ndarray:
        """uint8 [H, W, C] pixels, at the smallest codec scale that keeps at least min_height x min_width."""
        if self.decoder == "turbojpeg" and data.startswith(JPEG_MAGIC):
            import simplejpeg

            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                height = width = None   # PIL may still read it
            if height is not None:
                self._check_pixels(width, height)
                try:
                    pixels = simplejpeg.decode_jpeg(data, "RGB" if self.channels == 3 else "GRAY",
                                                    min_height=min_height, min_width=min_width)
                    return pixels if pixels.ndim == 3 else pixels[:, :, None]
                except ValueError:
                    pass   # libjpeg-turbo refuses some JPEGs PIL reads (CMYK, ...): PIL decides
        return self._decode_pil(data, min_height, min_width)

    def _decode_pil(self, data: bytes, min_height: int, min_width: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with self._open(data) as img:
                mode = "RGB" if self.channels == 3 else "L"
                if img.format == "JPEG" and (min_height or min_width) and img.mode in ("RGB", "L"):
                    img.draft(img.mode, (max(min_width, 1), max(min_height, 1)))   # DCT-domain downscale only
                img = to_8bit(img).convert(mode)   # convert() forces the full decode inside the caller's try
        pixels = np.asarray(img)
        return pixels if pixels.ndim == 3 else pixels[:, :, None]

    # ------------------------------------------------------------------ transforms
    def train_crop(self, data: bytes, rng: np.random.Generator, crop_scale: tuple[float, float],
                   hflip: float) -> tuple[np.ndarray, bool]:
        """MAE's train transform: (uint8 [S, S, C] random resized crop, flip?) - the flip is left to the caller
        (the device flips the whole batch). Draws from `rng`: the crop box, then the flip."""
        height, width = self.size(data)
        top, left, h, w = random_resized_crop_params(rng, height, width, crop_scale)
        flip = bool(rng.random() < hflip)
        size = self.img_size
        # decode at the smallest scale whose crop still has >= S pixels each way (never upsampled twice)
        pixels = self.decode(data, math.ceil(height * size / h), math.ceil(width * size / w))
        fy, fx = pixels.shape[0] / height, pixels.shape[1] / width
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        return self._resize_box(pixels, box, (size, size)), flip

    def eval_crop(self, data: bytes) -> np.ndarray:
        """The standard eval transform: shorter side to S * 8/7 (aspect kept), then the centre S x S."""
        size = self.img_size
        short = int(round(size * EVAL_RESIZE_RATIO))
        height, width = self.size(data)
        if min(width, height) != short:  # shorter side to `short`, keeping the aspect ratio (as torchvision)
            if width <= height:
                new_w, new_h = short, int(short * height / width)
            else:
                new_w, new_h = int(short * width / height), short
            pixels = self.decode(data, new_h, new_w)
            pixels = self._resize_box(pixels, (0, 0, pixels.shape[1], pixels.shape[0]), (new_w, new_h))
        else:
            pixels = self.decode(data)
            new_h, new_w = pixels.shape[:2]
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        return np.ascontiguousarray(pixels[top:top + size, left:left + size])

    def _resize_box(self, pixels: np.ndarray, box: tuple[float, float, float, float],
                    out_wh: tuple[int, int]) -> np.ndarray:
        """pixels[box] resized to out_wh (width, height): OpenCV with turbojpeg where installed, else PIL bicubic
        (antialiased, fractional box: the original pipeline's exact pixels)."""
        cv2 = _cv2() if self.decoder == "turbojpeg" else None
        if cv2 is None:
            img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
            if box != (0, 0, img.width, img.height) or img.size != out_wh:
                img = img.resize(out_wh, Image.Resampling.BICUBIC, box=box)
            out = np.asarray(img)
        else:
            left, top = int(round(box[0])), int(round(box[1]))
            right, bottom = max(int(round(box[2])), left + 1), max(int(round(box[3])), top + 1)
            region = pixels[top:bottom, left:right]
            shrink = min(region.shape[1] / out_wh[0], region.shape[0] / out_wh[1])
            mode = cv2.INTER_AREA if shrink >= SHRINK_FOR_AREA else cv2.INTER_CUBIC
            out = region if region.shape[1::-1] == out_wh else cv2.resize(region, out_wh, interpolation=mode)
        return out if out.ndim == 3 else out[:, :, None]


def to_chw(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] numpy -> uint8 [C, H, W] torch (contiguous, so batches stack without a copy per image)."""
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    return torch.from_numpy(chw if chw.flags.writeable else chw.copy())   # PIL's arrays are read-only views


def normalise_batch(imgs: torch.Tensor, mean, std, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 (x / 255 - mean) / std, each image with flips[i] mirrored left-right; runs
    where `imgs` is (the training device), without a host sync. The same float32 operations as the original
    per-image CPU path, so the values are identical to it; the flip is done on uint8 (a quarter of the bytes)
    and the arithmetic in place (3x less time than out-of-place on a CPU)."""
    if imgs.dtype != torch.uint8:   # also keeps the in-place arithmetic off the caller's tensor
        raise ValueError(f"imgs must be a uint8 [B, C, H, W] tensor, got {imgs.dtype}")
    if flips is not None:
        imgs = torch.where(flips.view(-1, 1, 1, 1), imgs.flip(-1), imgs)
    x = imgs.to(torch.float32)
    x.div_(255.0)
    x.sub_(torch.as_tensor(mean, dtype=torch.float32, device=imgs.device).view(-1, 1, 1))
    x.div_(torch.as_tensor(std, dtype=torch.float32, device=imgs.device).view(-1, 1, 1))
    return x
