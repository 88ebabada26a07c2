"""Building Hugging Face transformers models from a spec, for the command line and the tools: a model
type with its config's settings changed (random weights), a local folder, or a Hub id; everything
transformers would refuse or silently get wrong is refused here in one line. Part of evit's
transformers host (:mod:`evit.hosts.transformers`): only these two files read transformers' attributes.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

from .base import check_patch_multiple
from .transformers import check_version, host, pair, quiet_loading
from .transformers_preprocessing import processor_output_size


def create_model(spec: str, pretrained: bool = False, checkpoint: bool = False, fresh_head: bool = False,
                 **overrides) -> nn.Module:
    """A transformers model from ``spec``: a local folder with ``config.json`` (with ``pretrained``: its
    weights too), or a model type (``vit``, ``deit``, ``clip_vision_model``, ``dinov2``,
    ``dinov2_with_registers``, ``siglip_vision_model``) whose default config ``overrides`` change, with
    random weights; or, with network access, a Hub id. Of a CLIP or SigLIP model (both towers) the image tower
    is built (CLIP's with its projection). ``overrides`` may name ``model_class`` (default:
    the type's image classifier, else its base model) and ``attn_implementation`` (default 'sdpa').
    With ``HF_HUB_OFFLINE=1`` anything but a local folder or a type fails at once. ``checkpoint``: weights
    will be loaded from a checkpoint file afterwards (a folder's own are then not needed). Settings the config
    does not have, sizes below one, a class of another model type and anything transformers cannot
    build or load are refused in one line (ValueError). ``fresh_head`` (fine-tuning): weights whose head is for
    other classes, or that hold none, load without it and the model's starts untrained (said); otherwise refused."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    check_version()
    model_class = overrides.pop("model_class", None)
    impl = overrides.pop("attn_implementation", "sdpa")
    folder = Path(spec).expanduser()
    if spec.startswith((".", "/", "~")) and not folder.is_dir():
        raise ValueError(f"hf:{spec}: no such folder (a local model is a folder with config.json)")
    weights = []
    if (folder / "config.json").is_file():
        weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        make_config = lambda: AutoConfig.from_pretrained(str(folder), **overrides)  # noqa: E731
    elif spec in CONFIG_MAPPING:
        if pretrained:
            raise ValueError(f"hf:{spec} is a model type, which has no weights: for --pretrained give a local folder "
                             "with config.json and weights, or a Hub id")
        make_config = lambda: AutoConfig.for_model(spec, **overrides)  # noqa: E731
    else:
        make_config = lambda: AutoConfig.from_pretrained(spec, **overrides)  # noqa: E731
    try:
        with quiet_loading():  # num_labels for other classes than a folder's id2label: said below, not warned
            config = make_config()
    except Exception as e:  # noqa: BLE001 - transformers' own refusals (OSError, validation errors), one line each
        if spec in CONFIG_MAPPING or folder.is_dir():
            raise ValueError(f"hf:{spec}: transformers refuses these settings ({_summary(e)}; values are read as "
                             "JSON: 64, true, null, [224, 224])") from None
        raise ValueError(f"hf:{spec} is neither a local folder with config.json nor a transformers model type "
                         f"({', '.join(sorted(t for t in CONFIG_MAPPING if t in _TYPES))}, ...), and the Hub could "
                         f"not give it ({_summary(e)})") from None
    tower = _TOWERS.get(config.model_type)
    if tower is not None:
        config = _image_tower(config, overrides)
    elif config.model_type not in _TYPES:
        raise ValueError(f"hf:{spec} is a {config.model_type} model; evit serves the model types {', '.join(_TYPES)}, "
                         f"and the image towers of {', '.join(_TOWERS)}")
    _check_settings(spec, config, overrides)
    if weights and not pretrained and not checkpoint:  # said once the folder is known to hold a model evit serves
        raise ValueError(f"hf:{spec} holds weights ({weights[0]}) that random weights would silently replace: "
                         "pass --pretrained (pretrained=True) to load them, or give a folder with only config.json")
    # the class a folder's model was saved as; a two-tower model's image tower is its own class
    model_class = model_class or tower or next(iter(getattr(config, "architectures", None) or []), None)
    if model_class is not None:
        cls = getattr(transformers, str(model_class), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(f"transformers has no model class {model_class!r}")
        if not isinstance(config, cls.config_class):
            raise ValueError(f"{model_class} is not a {config.model_type} model (it takes {cls.config_class.__name__}, "
                             f"not {type(config).__name__}); give a model_class of that type, e.g. "
                             f"{_default_class(config).__name__}")
    else:
        cls = _default_class(config)
    try:
        if not pretrained:
            return _at_processor_size(_drawn_tokens(cls._from_config(config, attn_implementation=impl)), folder,
                                      overrides)
        source = str(folder) if folder.is_dir() else spec
        # fine-tuning: the head is sized for other classes than the weights' and starts afresh
        load = dict(config=config, attn_implementation=impl, output_loading_info=True,
                    ignore_mismatched_sizes=fresh_head)
        with quiet_loading():
            model, info = cls.from_pretrained(source, **load)
            if info.get("missing_keys") and all(k.startswith("pooler.") for k in info["missing_keys"]):
                # weights saved without the pooler (ViTModel(add_pooling_layer=False), DINO's): the model without it
                model, info = cls.from_pretrained(source, **load, add_pooling_layer=False)
    except Exception as e:  # noqa: BLE001 - a model transformers cannot build or load from these, in one line
        if "ignore_mismatched_sizes" in str(e):
            raise ValueError(f"hf:{spec}: the weights' sizes do not fit the model's config (and the settings given); "
                             "give the settings the weights were trained with") from None
        raise ValueError(f"transformers could not {'load' if pretrained else 'build'} {cls.__name__} from hf:{spec} "
                         f"({_summary(e)})") from None
    resized = sorted(k for k, *_ in info.get("mismatched_keys") or [])
    in_head = host(model).in_head
    if any(not in_head(k) for k in resized):
        raise ValueError(f"hf:{spec}: the weights' sizes do not fit the model's config (and the settings given) beyond "
                         f"its head ({', '.join(resized[:3])}); give the settings the weights were trained with")
    missing = sorted(info.get("missing_keys") or [])
    # fine-tuning: a head the weights lack (a base model's, a teacher model's) starts untrained
    headless = bool(missing) and fresh_head and all(in_head(k) for k in missing)
    if resized or headless:
        held = "a head for other classes" if resized else f"no {cls.__name__} head"
        print(f"evit: the weights of hf:{spec} hold {held}; the model's head ({config.num_labels} outputs) starts "
              "untrained", file=sys.stderr)
    if missing and not headless:
        raise ValueError(f"hf:{spec}: the weights lack {len(missing)} of {cls.__name__}'s tensors ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}), which would start random; give the model_class the "
                         "weights were saved from")
    return _at_processor_size(model, folder, overrides)


def _at_processor_size(model: nn.Module, folder: Path, overrides: dict) -> nn.Module:
    """``model`` run at the size its folder's image processor gives, when it takes any size (DINOv2: its config's
    ``image_size``, 518, is the pretraining size, and its processor crops to 224, the size transformers runs it
    at); a size given in the spec (``image_size``) stays."""
    saved = folder / "preprocessor_config.json"
    found = host(model)
    if "image_size" in overrides or not found.takes_any_size or not saved.is_file():
        return model
    size = processor_output_size(saved)
    if size is not None and size != tuple(found.input_size[1:]):
        found.set_input_size(size)
    return model


def _drawn_tokens(model: nn.Module) -> nn.Module:
    """``model`` with its class, distillation and register tokens drawn at random where transformers starts them
    at zero (DeiT): a zero class token's query is zero, so it attends to every token alike, and EViT's ranking of
    a random model would be all ties (which kernels break differently). Drawn as ViT draws its class token."""
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "distillation_token", "register_tokens")) and not p.any():
                p.normal_(0.0, std)
    return model


def _summary(e: BaseException) -> str:
    """An exception in one line: its type and its message's last line (transformers puts the point there)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


def _default_class(config) -> type:
    """The model type's image classifier, else its base model."""
    from transformers import AutoModel, AutoModelForImageClassification

    try:
        cls = AutoModelForImageClassification._model_mapping[type(config)]
    except KeyError:
        cls = AutoModel._model_mapping[type(config)]
    return cls[0] if isinstance(cls, (tuple, list)) else cls


#: config settings that count something: below one (zero for registers) no model can be built
_COUNTS = {"hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 1,
           "patch_size": 1, "image_size": 1, "num_channels": 1, "num_labels": 1, "num_register_tokens": 0}


def _check_settings(spec: str, config, overrides: dict) -> None:
    """Refuse settings the config does not have (a typo would be ignored), counts below their least, and a
    hidden size that the heads do not divide."""
    known = set(type(config)().to_dict()) | {"num_labels", "id2label", "label2id"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"hf:{spec}: {type(config).__name__} has no setting {', '.join(map(repr, unknown))}")
    for key, least in _COUNTS.items():  # as given: transformers reads some (num_labels=-3) as another number
        values = overrides[key] if key in overrides else getattr(config, key, None)
        for v in values if isinstance(values, (list, tuple)) else [values]:
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= least):
                raise ValueError(f"hf:{spec}: {key} must be a whole number of at least {least}, got {values!r}")
    width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ValueError(f"hf:{spec}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is not None and patch is not None:
        for key, value in (("image_size", image), ("patch_size", patch)):
            if not isinstance(value, int) and len(value) != 2:
                raise ValueError(f"hf:{spec}: {key} is one number or [height, width], got {value!r}")
        (h, w), (ph, pw) = pair(image), pair(patch)
        # a patch larger than the image cannot run; a size the patches do not divide is cropped by the patch
        # embedding, which evit refuses for sizes given here (a saved model trained so is left as it was made)
        if ph > h or pw > w or {"image_size", "patch_size"} & set(overrides):
            check_patch_multiple((h, w), (ph, pw), what=f"hf:{spec}: image_size")


_TYPES = ("vit", "deit", "clip_vision_model", "dinov2", "dinov2_with_registers", "siglip_vision_model")

#: two-tower (image and text) model types whose image tower evit serves, as the model of this class: CLIP's with its
#: projection (the image embedding its text tower is compared with), SigLIP's as it is
_TOWERS = {"clip": "CLIPVisionModelWithProjection", "siglip": "SiglipVisionModel"}


def _image_tower(config, overrides: dict):
    """The image tower's config of a two-tower model's ``config``, with ``overrides`` applied to it (transformers
    applied them to the outer config). CLIP's projection width is the outer config's unless an override sets it.
    The tower's weights load from the whole model's (their names match; the text tower's are left unused)."""
    tower = copy.deepcopy(config.vision_config)
    if hasattr(config, "projection_dim"):
        tower.projection_dim = config.projection_dim
    for key, value in overrides.items():
        setattr(tower, key, value)
    return tower


def parse_spec(text: str) -> tuple[str, dict]:
    """``CONFIG_OR_ID[:key=value,...]`` (values read as JSON where they parse, else as text) ->
    (config or id, overrides): ``vit:hidden_size=384,num_hidden_layers=12,num_attention_heads=6``."""
    spec, _, rest = (text, "", "") if Path(text).exists() else text.partition(":")
    if not spec:
        raise ValueError("hf: needs a model type (e.g. hf:vit), a local folder with config.json or a Hub id")
    overrides = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [...] belong to a list value
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"hf:{text}: settings are key=value pairs separated by commas, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return spec, overrides
