"""The transformers step of the GPU run (``gpu.py --steps transformers``): evit on Hugging Face
transformers ViTs on the device, against the same models on the CPU.

For each served model family (small configs, random weights: the same weights on both devices), under
``attn_implementation`` "sdpa" and "eager", on the same images:

- the unpatched model on the device against the CPU (the device's kernels alone);
- at zero reduction (EViT keep 1.0, ToMe r=0: the patched layers hand over to transformers' own forward),
  patched against unpatched on the device: the patch changes nothing there;
- EViT at keep 0.5 and ToMe at r=3 on the device against the CPU: a token chosen differently would show
  as a difference far above the kernels' own;
- EViT at keep 0.5 in bfloat16 autocast on the device: finite, and how far from float32.

Speed on the device comes from the bench step, which serves transformers models by ``hf:`` spec too
(``--models hf_vit_small hf_vit_base``).
"""
from __future__ import annotations

import copy
import math

import torch

import evit
from evit import hosts

#: a small config per served family, and the settings beyond it (prefix tokens: DeiT 2, registers 1 + 4)
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8)
FAMILIES = {
    "ViTForImageClassification": ("ViTConfig", dict(intermediate_size=128)),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", dict(intermediate_size=128)),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", dict(intermediate_size=128, projection_dim=32)),
    "Dinov2ForImageClassification": ("Dinov2Config", dict(mlp_ratio=2, layerscale_value=0.5)),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", dict(mlp_ratio=2, num_register_tokens=4)),
}
#: (label, method, settings) run on both devices
REDUCED = (("evit 0.5", "evit", {"keep_rate": 0.5}), ("tome r=3", "tome", {"r": 3}))
ZERO = (("evit 1.0", "evit", {"keep_rate": 1.0}), ("tome r=0", "tome", {"r": 0}))


def build(name: str, impl: str) -> torch.nn.Module:
    """``name`` from its small config, seeded. Tokens, biases and position embeddings are drawn at random too:
    transformers starts them at zero, and a class token of zeros attends uniformly (EViT's ranking all ties)."""
    import transformers

    config_name, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SMALL, **extra})
    model = getattr(transformers, name)._from_config(config, attn_implementation=impl)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("bias", "token", "tokens", "embeddings", "class_embedding")) and "norm" not in n:
                p.normal_(0, 0.2)
    return model.eval()


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hosts.adapter(model).forward(x).float().cpu()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def transformers_step(run, device: torch.device, cfg: dict) -> list[dict]:
    """One row per family and attention implementation: the largest output differences (see the module)."""
    rows = []
    torch.manual_seed(1)
    x = torch.randn(8, 3, SMALL["image_size"], SMALL["image_size"])
    for name in FAMILIES:
        for impl in ("sdpa", "eager"):
            cpu = build(name, impl)
            dev = copy.deepcopy(cpu).to(device)
            row = dict(model=name, attn_implementation=impl, device=str(device))
            plain_cpu, plain_dev = _out(cpu, x), _out(dev, x.to(device))
            row["unpatched_device_vs_cpu"] = _diff(plain_dev, plain_cpu)
            row["zero_reduction_vs_unpatched"] = max(
                _diff(_out(evit.patch(dev, method=m, **s), x.to(device)), plain_dev) for _, m, s in ZERO)
            for label, method, settings in REDUCED:
                got_cpu = _out(evit.patch(cpu, method=method, **settings), x)
                got_dev = _out(evit.patch(dev, method=method, **settings), x.to(device))
                row[f"{label} device_vs_cpu"] = _diff(got_dev, got_cpu)
                row[f"{label} scale"] = float(got_cpu.abs().max())
            evit.patch(dev, keep_rate=0.5)
            fp32 = _out(dev, x.to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16 = _out(dev, x.to(device))
            row["evit 0.5 bf16 finite"] = bool(torch.isfinite(bf16).all())
            row["evit 0.5 bf16_vs_fp32"] = _diff(bf16, fp32)
            rows.append(row)
            run.say(f"{name:<38} {impl:<5} unpatched dev-cpu {row['unpatched_device_vs_cpu']:.1e}; zero reduction "
                    f"{row['zero_reduction_vs_unpatched']:.1e}; evit 0.5 dev-cpu {row['evit 0.5 device_vs_cpu']:.1e} "
                    f"(outputs up to {row['evit 0.5 scale']:.1f}); tome r=3 dev-cpu {row['tome r=3 device_vs_cpu']:.1e}; "
                    f"bf16 {'finite' if row['evit 0.5 bf16 finite'] else 'NOT FINITE'}, "
                    f"{row['evit 0.5 bf16_vs_fp32']:.1e} from fp32")
            run.write()
            assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    return rows
