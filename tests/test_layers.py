"""The structure, checked from the source: layers, no import cycle, host attributes read only in host files.

Layers, lowest first: hosts -> mechanism (attention, interface, registry, patch) -> methods ->
measures (helpers the tools share) -> tools -> commands -> the package's public API. A module may
import modules of its own layer or below, never above; the imports between evit's modules (at
module level and inside functions alike) form no cycle. Every module must be placed in a layer,
so a new one is placed on purpose.
"""
import ast
from pathlib import Path

import pytest
import torch

import evit

SRC = Path(evit.__file__).parent

LAYERS = [
    ("hosts", {"evit.hosts", "evit.hosts.base", "evit.hosts.timm", "evit.hosts.transformers",
               "evit.hosts.transformers_models", "evit.hosts.transformers_preprocessing"}),
    ("mechanism", {"evit.attention", "evit.reduction", "evit.registry", "evit.patch"}),
    ("methods", {"evit.methods"} | {f"evit.methods.{p.stem}" for p in (SRC / "methods").glob("*.py")
                                    if p.stem != "__init__"}),
    ("measures", {"evit.cost", "evit.timing", "evit.resolution", "evit.masks", "evit.models", "evit.data",
                  "evit.checkpoint", "evit.schedule", "evit.weights", "evit.runs", "evit.outputs", "evit.images"}),
    ("tools", {"evit.bench", "evit.budget", "evit.evaluate", "evit.compare", "evit.show", "evit.export",
               "evit.train", "evit.train_setup", "evit.folders", "evit.embedded", "evit.validation", "evit.loading"}),
    ("commands", {"evit.cli", "evit.commands"}),
    ("api", {"evit"}),
]
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def _module_name(path: Path) -> str:
    parts = ["evit", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """evit modules that ``name`` imports, anywhere in its source (``from .x import y`` names ``x.y`` when
    that is a module, else ``x``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LAYER_OF), f"place these modules in LAYERS: {sorted(set(MODULES) ^ set(LAYER_OF))}"


def test_no_module_imports_a_layer_above_it():
    upward = [f"{m} ({LAYERS[LAYER_OF[m]][0]}) imports {d} ({LAYERS[LAYER_OF[d]][0]})"
              for m, deps in GRAPH.items() for d in deps if LAYER_OF[d] > LAYER_OF[m]]
    assert not upward, upward


def test_no_import_cycle():
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if m in done:
            return
        path.append(m)
        for d in sorted(GRAPH[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)


def test_the_checks_see_real_imports():
    """The parser finds what is there: the patch imports the hosts, the interface and the registry."""
    assert {"evit.hosts", "evit.attention", "evit.reduction", "evit.registry"} <= GRAPH["evit.patch"]
    assert "evit.patch" in GRAPH["evit.methods.stvit"] and "evit.hosts.timm" in GRAPH["evit.hosts"]
    assert "evit.timing" in GRAPH["evit.evaluate"] and "evit.bench" not in GRAPH["evit.evaluate"]


# ---- host attributes ------------------------------------------------------------------------------
#
# The rule: outside src/evit/hosts/, (1) no module imports timm's model classes (timm.models,
# timm.layers) or transformers; timm's data and training library (timm.data, timm.loss, timm.optim,
# timm.scheduler, timm.utils) and its model factory (``timm.create_model`` in evit.models, the loading
# path) are libraries evit uses, not models it reads; (2) no attribute named in HOST_ATTRIBUTES is read:
# the structural attributes of timm's and transformers' ViT classes (checked below to be real
# attributes of such models); (3) no attribute of a variable named ``model`` is read except
# nn.Module's own API: that catches host attributes whose names evit also uses for its own objects
# (``host.blocks``, ``method.num_prefix_tokens``, ``view.attention``, ...). ``getattr(x, "name")`` and
# ``hasattr(x, "name")`` with a literal name count as reads.

TIMM_ATTRIBUTES = {
    "patch_embed", "pretrained_cfg", "global_pool", "attn_pool", "cls_token", "reg_token", "pos_embed",
    "dynamic_img_size", "norm_pre", "fc_norm", "qkv", "q_norm", "k_norm", "fused_attn", "attn_drop",
    "proj_drop", "norm1", "norm2", "ls1", "ls2", "drop_path1", "drop_path2", "grid_size", "dynamic_feat_size",
    "num_patches", "forward_features", "forward_head", "num_classes",
}
TRANSFORMERS_ATTRIBUTES = {
    "config", "embeddings", "encoder", "vision_model", "visual_projection", "pre_layrnorm", "post_layernorm",
    "layernorm", "layernorm_before", "layernorm_after", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
    "out_proj", "layer_norm1", "layer_norm2", "layer_scale1", "layer_scale2", "classifier", "cls_classifier",
    "distillation_classifier", "distillation_token", "register_tokens", "position_embeddings",
    "patch_embeddings", "class_embedding", "num_register_tokens", "num_attention_heads", "_attn_implementation",
    "num_labels",
}
HOST_ATTRIBUTES = TIMM_ATTRIBUTES | TRANSFORMERS_ATTRIBUTES
MODULE_API = set(dir(torch.nn.Module()))
HOST_FILES = {"evit.hosts.timm", "evit.hosts.transformers", "evit.hosts.transformers_models",
              "evit.hosts.transformers_preprocessing", "evit.hosts",
              "evit.hosts.base"}


def _read(where: str, receiver: ast.expr, attr: str) -> list[str]:
    if attr in HOST_ATTRIBUTES:
        return [f"{where} reads .{attr}"]
    if isinstance(receiver, ast.Name) and receiver.id == "model" and attr not in MODULE_API:
        return [f"{where} reads model.{attr}"]
    return []


def _violations(name: str, path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n.split(".")[0] == "transformers" or n.startswith(("timm.models", "timm.layers")) or \
                        (n == "timm" and name != "evit.models"):
                    found.append(f"{where} imports {n}")
        elif isinstance(node, ast.Attribute):
            found += _read(where, node.value, node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            found += _read(where, node.args[0], node.args[1].value)  # getattr(model, "blocks") reads it too
    return found


def test_host_attributes_are_read_only_in_host_files():
    found = [v for name, path in MODULES.items() if name not in HOST_FILES for v in _violations(name, path)]
    assert not found, found


def test_the_rule_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import timm.layers\n\ndef f(model, block):\n"
                   "    return model.blocks, block.attn.qkv, model.eval(), getattr(model, 'num_classes', 0)\n")
    found = _violations("evit.bad", bad)
    assert len(found) == 4 and any("timm.layers" in f for f in found) and any("model.blocks" in f for f in found)
    assert any(".num_classes" in f for f in found)


def _attribute_names(*objects) -> set[str]:
    names = set()
    for obj in objects:
        modules = list(obj.modules()) if isinstance(obj, torch.nn.Module) else [obj]
        for m in modules:
            names |= set(dir(m)) | set(getattr(m, "_modules", {})) | set(getattr(m, "_parameters", {}))
            if hasattr(m, "config"):
                names |= set(dir(m.config))
    return names


def test_host_attribute_lists_name_real_host_attributes():
    import timm

    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=1, img_size=28, embed_dim=48,
                            num_heads=2, init_values=1e-5, qk_norm=True)
    assert TIMM_ATTRIBUTES <= _attribute_names(vit, vit.patch_embed), TIMM_ATTRIBUTES - _attribute_names(vit)
    transformers = pytest.importorskip("transformers")
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                patch_size=14)
    models = [transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**tiny)),
              transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**tiny)),
              transformers.Dinov2WithRegistersForImageClassification(transformers.Dinov2WithRegistersConfig(**tiny)),
              transformers.ViTForImageClassification(transformers.ViTConfig(**tiny))]
    missing = TRANSFORMERS_ATTRIBUTES - _attribute_names(*models)
    assert not missing, missing
