"""Deployment of (patched or unpatched) ViTs: ONNX export, an onnxruntime runner, torch.compile.

A patched block's token counts depend only on the sequence length, and a fixed image size
fixes that, so the whole model, token ranking and fusion included, is one static graph: it
exports to ONNX and compiles with torch.compile without graph breaks. Only the batch axis
may vary (see :func:`export_onnx`).

Exporter choice: the dynamo-based ``torch.onnx.export(..., dynamo=True)``, with no fallback to
the TorchScript one (``dynamo=False``), which is deprecated and which rejected EViT as first
written: its ``sort(stable=True)`` was read as a ``sort`` with an ``out`` argument. The dynamo
exporter's op library lacked ``aten.sort.stable`` too, but it takes extra translations:
:func:`_sort_stable` maps it to ONNX ``TopK``, whose specification breaks ties by the lower
index, i.e. a stable sort. So methods may sort stably (the eager fast path stays as it is)
and still export; ``torch.export`` also keeps the batch axis dynamic through their shape maths.

bf16 on CPU needs nothing from this module: ``model.to(torch.bfloat16)`` or
``torch.autocast("cpu", dtype=torch.bfloat16)`` both run a patched model (tests check it).
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import hosts
from .checkpoint import READING_KEYS
from .cost import native_input_size
from .outputs import check_file_destination
from .patch import check_model, reductions

_INSTALL_HINT = "install them with `pip install 'evit[export]'` (or `pip install onnx onnxscript onnxruntime`)"


def _require(*modules: str, purpose: str) -> None:
    """Import ``modules`` now, so a missing one fails with what to install, not deep in torch.onnx."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                           f"not installed: {_INSTALL_HINT}")


def _sort_stable(self: Any, dim: int = -1, descending: bool = False, stable: Optional[bool] = None) -> Any:
    """ONNX translation of ``aten.sort.stable``: a full-length ``TopK``.

    ONNX TopK orders equal values by lower index first (its specification says so), which is
    exactly what a stable sort guarantees (e.g. prefix tokens all scored +inf keep their order).
    Values are onnxscript tensors; this runs at translation time.
    """
    from onnxscript import opset18 as op

    n = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, n, axis=dim, largest=descending, sorted=True)


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> tuple[int, int, int]:
    size = tuple(native_input_size(model) if input_size is None else input_size)
    if len(size) != 3 or any(int(s) <= 0 for s in size):
        raise ValueError(f"input_size must be (channels, height, width) with positive sizes, got {size}")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_size: Optional[Sequence[int]] = None,
    batch_size: int = 1,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` (a timm ViT, patched or not) to ``path`` as ONNX and return the path.

    The image size is fixed (``input_size`` (C, H, W), default the model's native size),
    because the patched blocks' token counts follow from it. With ``dynamic_batch`` the batch
    axis is left free, named ``batch``; the trace then uses a batch of at least 2, since
    ``torch.export`` fixes an axis traced at size 1. ``dynamic_batch=False`` fixes it at
    ``batch_size``: a static graph gives onnxruntime a little more to optimise at batch 1.
    The model is exported in eval mode and left in the mode it was in. How it reads images (and its class names,
    where it records them) go into the file's ``metadata_props`` (:func:`_describe`). ``opset`` defaults to
    the exporter's (at least 18). Weights go inside the file unless they pass ONNX's 2 GB limit, in which
    case they go to ``<path>.data`` beside it.
    """
    host = check_model(model, next(iter(reductions(model).values()), None))  # served with the method it is patched with
    path = Path(path)
    check_file_destination(path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if opset is not None and opset < 18:
        # the exporter builds at opset 18 or later; converting down fails for ViT ops and then
        # silently leaves 18, so refuse rather than write a file that is not what was asked for
        raise ValueError(f"opset must be at least 18 (the lowest the torch.onnx exporter writes), got {opset}")
    size = _input_size(model, input_size)
    _require("onnx", "onnxscript", purpose="ONNX export")
    import onnx

    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} is newer than this onnx knows ({onnx.defs.onnx_opset_version()}); "
                         "give at most that, or leave --opset out")

    param = next(model.parameters())
    example = torch.randn(max(batch_size, 2) if dynamic_batch else batch_size, *size, dtype=param.dtype)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    was_training = model.training
    model.eval()
    try:
        # no_grad: trace the inference path (EViT then writes the fused token in place instead
        # of concatenating); inference_mode(False): torch.export cannot trace inference tensors.
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                model if host.returns_tensor else MainOutput(model).eval(), (example,), str(path), dynamo=True, opset_version=opset, verbose=False,
                input_names=["images"], output_names=["logits"], external_data=large,
                dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
                custom_translation_table={torch.ops.aten.sort.stable: _sort_stable},
            )
    except Exception as e:  # torch's message is pages long: keep its summary line, chain the rest
        summary = [ln for ln in str(e).split("## Exception summary")[-1].strip().splitlines() if ln.strip()]
        raise RuntimeError(f"torch.onnx.export could not export this model: {summary[0] if summary else repr(e)} "
                           "(see the chained exception for the full trace)") from e
    finally:
        model.train(was_training)
    _describe(path, model, size)
    return path


def _describe(path: Path, model: nn.Module, size: Sequence[int]) -> None:
    """Write into the ONNX file's ``metadata_props`` what a program running it must know of its input and output:
    ``evit_preprocessing`` (JSON: input_size, mean, std, crop_pct, interpolation: how the model reads images, as
    evit eval reads them) and, where the model records them, ``evit_class_names`` (JSON list, in output order)."""
    import onnx

    config = hosts.data_config(model, size)
    props = {"evit_preprocessing": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
                                               if k in ("input_size", *READING_KEYS)})}
    names = hosts.class_names(model)
    if names:
        props["evit_class_names"] = json.dumps(list(names))
    proto = onnx.load(str(path), load_external_data=False)  # weights beyond 2 GB stay in their .data file
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


class MainOutput(nn.Module):
    """``model``'s main output tensor (logits, or its embedding), for a model whose library returns an output
    object (transformers): the ONNX graph's one output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return hosts.adapter(self.model).forward(images)


class OnnxRunner:
    """Runs an ONNX model with onnxruntime on CPU: torch tensor in, torch tensor out.

    ``session`` is the ``onnxruntime.InferenceSession`` (for inputs, outputs, profiling).
    """

    def __init__(
        self, source: Union[str, os.PathLike, bytes], threads: Optional[int] = None, spinning: Optional[bool] = None
    ) -> None:
        _require("onnxruntime", purpose="running an ONNX model")
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Same thread count as torch, so an eager-vs-onnxruntime comparison is like for like;
        # one inter-op thread: a ViT is a chain of ops, parallel branches would only contend.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the CPU provider warns about unused initialisers
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if not isinstance(source, bytes):
            source = str(source)
            if not Path(source).is_file():
                raise FileNotFoundError(f"ONNX file {source} does not exist")
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def onnx_runner(
    path_or_model: Union[str, os.PathLike, nn.Module],
    threads: Optional[int] = None,
    spinning: Optional[bool] = None,
    **export_kwargs: Any,
) -> OnnxRunner:
    """A callable running an ONNX file, or ``model`` exported on the fly, with onnxruntime on CPU.

    For a model, ``export_kwargs`` go to :func:`export_onnx` (``input_size``, ``batch_size``,
    ``opset``, ``dynamic_batch``); the file is written to a temporary folder and removed once
    loaded. ``threads`` defaults to ``torch.get_num_threads()``. ``spinning`` sets whether
    onnxruntime's worker threads busy-wait for work after a run (default: onnxruntime's, on):
    good for one model serving back to back, but the spinning threads take cores from whatever
    runs next in the same process, such as another session or torch.
    """
    if isinstance(path_or_model, nn.Module):
        with tempfile.TemporaryDirectory(prefix="evit-onnx-") as tmp:
            path = export_onnx(path_or_model, Path(tmp) / "model.onnx", **export_kwargs)
            if Path(f"{path}.data").exists():  # external weights: the session must read them from disk
                return OnnxRunner(path, threads, spinning)
            return OnnxRunner(path.read_bytes(), threads, spinning)
    if export_kwargs:
        raise TypeError(f"export arguments {sorted(export_kwargs)} only apply when a model is given, not a file")
    return OnnxRunner(path_or_model, threads, spinning)


def compile_model(
    model: nn.Module,
    freezing: bool = True,
    fullgraph: bool = True,
    dynamic: bool = False,
    mode: Optional[str] = None,
) -> nn.Module:
    """``torch.compile`` set up for CPU inference of a (patched) ViT; returns the compiled module.

    ``fullgraph=True`` makes any graph break an error at the first call instead of a silent
    split: the token reduction must compile into the same graph as the blocks around it, or
    the speed-up is eaten by the Python round trips. ``dynamic=False``: shapes are fixed by
    the image size, and static shapes let inductor specialise every kernel. ``freezing``
    (inductor's CPU inference setting) folds the weights into the graph as constants, which
    lets it prepack them for its GEMMs; it applies to calls under ``torch.no_grad()`` or
    ``torch.inference_mode()``, and weights changed after the first call are not seen.
    ``mode`` (e.g. ``"max-autotune"``) replaces the freezing option when given. Changing the
    keep rate or the patch recompiles (dynamo guards on it). The model is put in eval mode.
    """
    model.eval()
    if mode is not None:
        return torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, mode=mode)
    return torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, options={"freezing": freezing})


def graph_breaks(model: nn.Module, example: Tensor) -> list[str]:
    """Why dynamo would split ``model``'s forward on ``example`` (empty: one graph), via
    ``torch._dynamo.explain``. It resets dynamo, so compiled models recompile on their next call."""
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(example)
    reasons = [str(getattr(r, "reason", r)) for r in explanation.break_reasons]
    return reasons or ([] if explanation.graph_count <= 1 else [f"{explanation.graph_count} graphs"])
