"""A local transformers model folder's ``preprocessor_config.json`` read as evit's image transform applies it:
the settings of transformers' image processor (mean, std, rescaling, resampling, centre crop) turned into the
mean, std, interpolation and crop share of images read in 0..1, or a one-line refusal of a file transformers
would refuse. Part of evit's transformers host (:mod:`evit.hosts.transformers`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

#: PIL's resampling filters by the number an image processor saves as ``resample``, in timm's names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: the settings read here, which a processor class defaults when a file leaves them out
_SETTINGS = ("do_normalize", "image_mean", "image_std", "do_rescale", "rescale_factor", "resample", "size", "crop_size",
             "do_center_crop")


def saved_preprocessing(path: Path, channels: int, defaults: dict) -> dict:
    """``defaults`` (mean, std, crop_pct, interpolation: what evit's transform applies to images read in 0..1)
    with what the image-processor settings in ``path`` change, as transformers' processor applies them: its
    mean and std (a number for every channel), none with ``do_normalize`` false, pixels scaled by
    ``rescale_factor`` (none with ``do_rescale`` false) before them, its ``resample`` filter, its resizing (to
    height x width, or by the shorter side) and its centre crop. A file transformers would refuse, or whose settings cannot be read so, is refused in one line."""
    given, processor = _settings(path)

    def per_channel(key: str, default: tuple) -> tuple:
        value = given.get(key)
        if value is None:
            return tuple(default)
        values = [value] * channels if isinstance(value, (int, float)) else value
        if not (isinstance(values, list) and len(values) in (1, channels) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise ValueError(f"{path}: {key} must be a finite number or a list of {channels} (the model's channels), "
                             f"got {value!r}; mend it")
        return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)

    found = dict(defaults)
    if given.get("do_normalize", True):
        found["mean"], found["std"] = per_channel("image_mean", defaults["mean"]), per_channel("image_std", defaults["std"])
        if not all(s > 0 for s in found["std"]):
            raise ValueError(f"{path}: image_std must be positive, got {list(found['std'])}; mend it")
    else:  # the pixels as rescaled, not normalised
        found["mean"], found["std"] = (0.0,) * channels, (1.0,) * channels
    factor = given.get("rescale_factor", 1 / 255) if given.get("do_rescale", True) else 1.0
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0):
        raise ValueError(f"{path}: rescale_factor must be a positive number, got {factor!r}; mend it")
    scale = 255 * factor  # the processor feeds pixel * factor where evit's transform gives pixel / 255
    found["mean"], found["std"] = (tuple(m / scale for m in found["mean"]), tuple(s / scale for s in found["std"]))
    if "resample" in given:
        if given["resample"] not in _RESAMPLE:
            raise ValueError(f"{path}: resample {given['resample']!r} is not one of PIL's filters "
                             f"({', '.join(f'{k} {v}' for k, v in _RESAMPLE.items())}); mend it")
        found["interpolation"] = _RESAMPLE[given["resample"]]
    size, crop = given.get("size") or {}, given.get("crop_size") or {}
    if isinstance(size, int):  # older processors save one number: both sides, or the shorter one (CLIP's, DINOv2's)
        square = getattr(processor, "default_to_square", True) if processor else defaults.get("crop_mode") == "squash"
        size = {"height" if square else "shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop}
    if isinstance(size, dict) and (size.get("height") or size.get("shortest_edge")):
        # resized to height x width (ViT's, DeiT's processors), else by the shorter side (CLIP's, DINOv2's)
        found["crop_mode"] = "squash" if size.get("height") else "center"
        if given.get("do_center_crop") and isinstance(crop, dict) and crop.get("height"):
            found["crop_pct"] = crop["height"] / (size.get("height") or size["shortest_edge"])
        elif "do_center_crop" in given:  # no crop: the whole resized image
            found["crop_pct"] = 1.0
    return found


def processor_output_size(path: Path) -> "tuple[int, int] | None":
    """(height, width) of the images the processor settings in ``path`` give: its centre crop's, else the size it
    resizes to; None when that depends on the image (resized by the shorter side, not cropped)."""
    given, processor = _settings(path)
    crop, size = given.get("crop_size"), given.get("size")
    if given.get("do_center_crop") and crop:
        return (crop, crop) if isinstance(crop, int) else _box(crop)
    if not given.get("do_resize", True):
        return None
    if isinstance(size, int):  # both sides, or the shorter one (CLIP's, DINOv2's processors)
        return (size, size) if getattr(processor, "default_to_square", True) else None
    return _box(size) if isinstance(size, dict) else None


def _box(size: dict) -> "tuple[int, int] | None":
    return (int(size["height"]), int(size.get("width") or size["height"])) if size.get("height") else None


def _settings(path: Path) -> tuple[dict, object]:
    """(the settings in ``path``, completed by its processor class's defaults as transformers builds it; that
    class or None), or a one-line refusal of a file that holds no settings."""
    try:
        given = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e}); mend or remove it") from None
    if not isinstance(given, dict):
        raise ValueError(f"{path} holds a JSON {type(given).__name__}, not image-processor settings (an object); "
                         "mend or remove it")
    processor = _processor_class(given)
    if processor is not None:  # a setting the file leaves out is its processor class's
        given = {**{k: getattr(processor, k) for k in _SETTINGS if getattr(processor, k, None) is not None}, **given}
    for key in ("size", "crop_size"):  # transformers refuses other sizes; read as none, they would go unapplied
        value = given.get(key)
        if value is not None and not (_pixels(value) or isinstance(value, dict) and any(value.values()) and all(
                v is None or _pixels(v) for v in value.values())):
            raise ValueError(f"{path}: {key} must be a positive whole number of pixels or an object of them (height "
                             f"and width, or shortest_edge), got {value!r}; mend it")
    return given, processor


def _pixels(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _processor_class(given: dict):
    """The transformers image-processor class the settings name (``image_processor_type``, or an older
    ``feature_extractor_type``, renamed as transformers renames it), or None."""
    import transformers

    name = str(given.get("image_processor_type") or given.get("feature_extractor_type") or "")
    name = name.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast")
    return getattr(transformers, name, None) if name.endswith("ImageProcessor") else None
