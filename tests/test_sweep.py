"""The timm sweep (benchmarks/timm_sweep.py) on two served and two refused architectures."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "timm_sweep.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("timm_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_serves_deit_and_a_gap_vit_and_refuses_siglip_and_eva():
    sweep = _sweep()
    status, detail = sweep.check("deit_tiny_patch16_224", depth=2)
    assert status == "served", detail
    assert "197->140->" in detail  # EViT keep 0.7 at its first location: ceil(0.7 * 196) + 1
    status, detail = sweep.check("vit_medium_patch16_gap_256", depth=1)  # average-pooled
    assert status == "served" and detail.startswith("by random, tome only"), detail
    status, detail = sweep.check("vit_base_patch16_siglip_224", depth=1)
    assert status == "refused" and "global_pool='map'" in detail
    status, detail = sweep.check("eva02_tiny_patch14_224", depth=1)
    assert status == "refused" and "only timm VisionTransformer models" in detail


def test_sweep_lists_the_vit_modules():
    pairs = _sweep().architectures(("deit",))
    assert ("deit", "deit_tiny_patch16_224") in pairs and {module for module, _ in pairs} == {"deit"}
