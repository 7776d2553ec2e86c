"""ONNX export of a detector: one self-contained graph that ONNX Runtime runs without torch.

The graph (`ExportGraph`) takes float32 ``images`` (B, 3, S, S) RGB in [0, 1] with a dynamic batch B,
normalises them with the backbone's mean/std, runs the method's ``forward_batch`` and returns
``scores`` (B,) and ``maps`` (B, S, S) (bilinear to S when the method's maps are coarser), exactly what
`Method.predict` computes for an S×S input before it resizes maps to each image's own size.

Everything that does not depend on the image is evaluated once in eager mode and baked into the graph
as constants: the text anchors of the exported classes (the text tower never runs at inference) and,
for few-shot methods, the features of the support set. With several classes the graph has a second
input ``class_index`` (B,) int64 into the metadata's class list: the anchors of all exported classes are
in the graph and each image uses its own class's (one pass over the batch, whatever the classes).

A method in int8 precision (`Method.set_precision`) is traced in fp32 and the graph is then quantised
with ONNX Runtime's dynamic quantisation (`quantize_int8`): the MatMuls whose weight is one of the linear
layers that PyTorch's int8 path quantises (the image blocks' q/k/v, out-projection and MLP) get int8
weights per tensor and uint8 activations quantised per call; projections, adapters, similarity heads
and the text constants stay fp32. (The torch-quantised model itself cannot be traced: torch.export
cannot flatten its packed int8 weights.)

Metadata (ONNX ``metadata_props``, all strings): ``anomalens.method``, ``anomalens.backbone``,
``anomalens.image_size``, ``anomalens.resize``, ``anomalens.classes`` (JSON list),
``anomalens.threshold`` (JSON number or null), ``anomalens.support_images``, ``anomalens.precision``
("fp32" or "int8"), ``anomalens.version``. `anomalens.onnx_model.OnnxModel` reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from anomalens.methods.base import ImageLike, Method, to_arrays

# Methods whose graph cannot be exported, with the reason given to the user (beyond the set-level ones and
# those that finish maps on the host, refused in `export_onnx`).
REFUSED = {
    "adaclip": (
        "adaclip cannot be exported to ONNX: its image score clusters patches with scikit-learn's k-means "
        "on the host, and its dynamic text prompts run the text tower for every image; use Method.predict"
    ),
}
# Method functions whose result depends only on non-tensor arguments (class names, or none): the text
# side. They run eagerly before tracing and their results become constants of the graph.
TEXT_FUNCTIONS = (
    "text_anchors",
    "frozen_anchors",
    "frozen_text",
    "text_features",
    "static_text",
    "cached_anchors",
)
METADATA_PREFIX = "anomalens."
# Precisions a graph can be exported in (`Method.precision`).
EXPORT_PRECISIONS = ("fp32", "int8")


class ExportGraph(nn.Module):
    """(B, 3, S, S) RGB in [0, 1] [+ class_index (B,)] → scores (B,), maps (B, S, S) of one method.

    Call it inside ``with graph.text:`` (see `TextConstants`); the first call records the text side.
    """

    def __init__(self, method: Method, class_names: Sequence[str], support: Any = None):
        super().__init__()
        self.method = method
        self.text = TextConstants(method, class_names)
        self.support = support
        self.size = method.backbone.image_size
        self.register_buffer(
            "input_mean", torch.tensor(method.backbone.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "input_std", torch.tensor(method.backbone.std).view(1, 3, 1, 1), persistent=False
        )

    def forward(
        self, images: torch.Tensor, class_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - self.input_mean) / self.input_std  # (B, 3, S, S) normalised
        if class_index is None:
            class_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # (B,)
        self.text.index = class_index
        out = self.method.forward_batch(x, self.text.class_names[:1], self.support)
        scores, maps = out.scores, out.maps.float()  # (B,), (B, h, w)
        if tuple(maps.shape[-2:]) != (self.size, self.size):
            # The same bilinear resize `Method.predict` applies (align_corners=False).
            maps = F.interpolate(maps[:, None], size=(self.size,) * 2, mode="bilinear", align_corners=False)
            maps = maps[:, 0]
        return scores.float(), maps


def export_onnx(
    method: Method,
    out: str | os.PathLike,
    class_names: Sequence[str],
    support: Sequence[ImageLike] | np.ndarray | None = None,
    opset: int | None = None,
) -> Path:
    """Write ``method`` as an ONNX model to ``out`` (see the module docstring for its contract).

    Args:
        method: a built or loaded method (it is moved to the CPU for tracing); its precision
            (`Method.set_precision`), "fp32" or "int8", is the graph's (int8: see the module docstring).
        out: the .onnx file to write; written only once the export succeeded.
        class_names: the classes whose text anchors are baked in (at least one, no duplicates).
        support: normal images of the class for few-shot methods (baked in as features); required
            when the method needs support (PatchCore fitted with `PatchCore.fit` carries its bank as a
            buffer, which is baked in like any weight).
        opset: ONNX opset (default: torch's).

    Raises:
        ValueError: an unsupported method (set-level, maps finished on the host, or in `REFUSED`)
            or precision, missing support, or bad class names.
    """
    precision = method.precision
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} cannot be exported: ONNX export writes fp32 or int8 graphs "
            "(ONNX Runtime's own CUDA/TensorRT providers choose half precision at run time)"
        )
    if method.name in REFUSED:
        raise ValueError(REFUSED[method.name])
    if type(method).finish_map is not Method.finish_map:
        raise ValueError(
            f"{method.name} cannot be exported to ONNX: it finishes each map at its image's own "
            "resolution on the host (finish_map), which a graph at a fixed size cannot reproduce; "
            "use Method.predict"
        )
    if getattr(method, "set_level", False):
        raise ValueError(
            f"{method.name} cannot be exported to ONNX: it scores each image against the other images "
            "of the evaluated set, which a per-image graph cannot hold"
        )
    names = list(class_names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names: give one or more distinct non-empty names, got {names!r}")
    if method.needs_support and support is None:
        raise ValueError(f"method {method.name!r} needs support images (normal images of the class)")
    method = method.cpu().eval()
    int8_weights = method.backbone.int8_weights() if precision == "int8" else []
    support_arrays = to_arrays(support, "support") if support is not None else []
    context = None
    if support_arrays:
        with torch.no_grad():
            images = method.backbone.preprocess(method.support_images(support_arrays), resize=method.resize)
            context = method.prepare_support(images)
    method.set_precision("fp32")  # traced in fp32 (int8: quantised by ONNX Runtime below)
    try:
        program = _export_program(method, names, context, opset)
    finally:
        method.set_precision(precision)
    metadata = export_metadata(method, names, len(support_arrays))
    program.model.metadata_props.update({METADATA_PREFIX + k: v for k, v in metadata.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp32":
        program.save(str(out))
        return out
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp, "fp32.onnx")
        program.save(str(fp32))
        quantize_int8(fp32, out, int8_weights)
    return out


def _export_program(method: Method, names: list[str], context: Any, opset: int | None) -> Any:
    """The `torch.onnx.ONNXProgram` of `ExportGraph` (see `export_onnx`)."""
    graph = ExportGraph(method, names, context).eval()
    size = method.backbone.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    args: tuple[torch.Tensor, ...] = (example,)
    batch = torch.export.Dim("batch")
    dynamic: dict[str, Any] = {"images": {0: batch}}
    inputs = ["images"]
    if len(names) > 1:
        args += (torch.zeros(2, dtype=torch.long),)
        dynamic["class_index"] = {0: batch}
        inputs.append("class_index")
    with graph.text, torch.no_grad():
        graph(*args)  # eager run: evaluates and records the text side
        try:
            # Exported here (not by torch.onnx's fallbacks) so that a batch dimension the code cannot
            # keep symbolic is an error, never a silently fixed batch size.
            exported = torch.export.export(graph, args, dynamic_shapes=dynamic, strict=False)
        except Exception as e:  # torch.export raises many types; the first line says what failed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{method.name} cannot be exported to ONNX: torch.export failed: {reason}"
            ) from e
    return torch.onnx.export(
        exported,
        args,
        input_names=inputs,
        output_names=["scores", "maps"],
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )


def quantize_int8(source: str | os.PathLike, out: str | os.PathLike, weights: Sequence[torch.Tensor]) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of the MatMuls of ``source`` whose constant weight is one
    of ``weights`` (each (out, in), as `nn.Linear` holds it; the graph multiplies by its transpose, or by
    a row block of it where code slices the packed q/k/v weight); written to ``out``.

    Weights int8 per tensor, activations uint8 quantised per call (``MatMulInteger`` after
    ``DynamicQuantizeLinear``); every other node, and the metadata, unchanged.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    wanted = {_fingerprint(part) for w in weights for part in _row_blocks(w.detach().float().cpu().numpy())}
    model = onnx.load(str(source))
    constants = {i.name: i for i in model.graph.initializer}
    nodes = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and node.input[1] in constants
        and _fingerprint(onnx.numpy_helper.to_array(constants[node.input[1]]).T) in wanted
    ]
    if not nodes:
        raise ValueError("int8 export: no MatMul of the graph uses the image tower's linear weights")
    # ONNX Runtime logs advice to run its pre-processing (shape inference and graph optimisations for
    # static quantisation); dynamic MatMul quantisation does not need it.
    advice = _DropRecords("Please consider to run pre-processing")
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(
            Path(source),
            Path(out),
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            weight_type=QuantType.QInt8,
        )
    finally:
        logging.getLogger().removeFilter(advice)
    return Path(out)


class _DropRecords(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _row_blocks(weight: np.ndarray) -> list[np.ndarray]:
    """A linear weight (out, in) and, for a packed q/k/v in-projection (3·in, in), its three blocks."""
    d_out, d_in = weight.shape
    return [weight, *np.split(weight, 3)] if d_out == 3 * d_in else [weight]


def _fingerprint(weight: np.ndarray) -> tuple[tuple[int, ...], str]:
    """Shape and a hash of the float32 values of a (out, in) weight."""
    values = np.ascontiguousarray(weight, dtype=np.float32).tobytes()
    return weight.shape, hashlib.blake2b(values, digest_size=16).hexdigest()


def export_metadata(method: Method, class_names: Sequence[str], support_images: int) -> dict[str, str]:
    """The string metadata stored in the ONNX model (keys without the ``anomalens.`` prefix)."""
    from anomalens import __version__

    return {
        "method": method.name,
        "backbone": str(method.backbone.name),
        "image_size": str(method.backbone.image_size),
        "resize": method.resize,
        "classes": json.dumps(list(class_names)),
        "threshold": json.dumps(method.threshold),
        "support_images": str(support_images),
        "precision": method.precision,
        "version": __version__,
    }


class TextConstants:
    """Within ``with``, the method's text functions (`TEXT_FUNCTIONS`) return constants.

    The first (eager) call of a function evaluates it and stores its result; later calls, and the calls
    made while tracing, return the stored tensors, so the text tower and the caches' weight checks
    (which branch on weight values) stay out of the graph. A function called with a list of class names
    is evaluated once for all exported classes, (C, ...), and returns the rows of `index` (B,): each
    image gets its own class's anchors with a symbolic batch size. A call with a tensor argument (e.g.
    Crane's image context) runs as usual and is traced. Calls made inside a text function run as usual.
    """

    def __init__(self, method: Method, class_names: Sequence[str]):
        self.method = method
        self.class_names = list(class_names)
        self.index: torch.Tensor | None = None  # (B,) class of each image, set by `ExportGraph`
        self._memo: dict[tuple[str, ...], Any] = {}
        self._depth = 0
        self._wrapped = [name for name in TEXT_FUNCTIONS if callable(getattr(method, name, None))]

    def __enter__(self) -> TextConstants:
        for name in self._wrapped:
            setattr(self.method, name, self._remember(name, getattr(self.method, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self._wrapped:
            delattr(self.method, name)

    def _remember(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            values = [*args, *kwargs.values()]
            if self._depth or any(isinstance(v, torch.Tensor) for v in values):
                return function(*args, **kwargs)
            per_class = bool(args) and isinstance(args[0], (list, tuple))
            if isinstance(args[0] if args else None, str) and len(self.class_names) > 1:
                raise ValueError(
                    f"{self.method.name} looks up text anchors one class name at a time, so it exports "
                    "one class per model: pass a single class name"
                )
            key = (name, *(repr(v) for v in values[int(per_class) :] if _is_name_like(v)))
            if key not in self._memo:
                if torch.compiler.is_exporting():
                    raise RuntimeError(f"export: {self.method.name}.{name} was not evaluated before tracing")
                self._depth += 1
                try:
                    call_args = (self.class_names, *args[1:]) if per_class else args
                    self._memo[key] = tree_map(_constant, function(*call_args, **kwargs))
                finally:
                    self._depth -= 1
            value = self._memo[key]
            return value[self.index] if per_class else value  # (B, ...) rows of the images' classes

        return call


def _is_name_like(value: Any) -> bool:
    """Arguments that identify a text-side result: names, None and numbers (not weights or callables)."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, str) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _constant(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
