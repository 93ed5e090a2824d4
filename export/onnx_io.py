"""Turn a torch module into a named ONNX file: dynamic axes, readable dim names, external data.

The one torch -> ONNX path of the project: the language-model graphs (export/exporter.py,
calibration's re-export) and the safety detector (guard_models/detector_export.py) all go
through `export_onnx`, which uses `torch.onnx.export(dynamo=True)` with `dynamic_shapes`.
The detector keeps its weights inline (`external_data=False`: a few MB, one file per
variant, so each variant's sha256 covers all of it) and asks for module-scoped node names
(`scope_node_names=True`: `/head/...`, `/tower/...`, in place of the exporter's per-node
debug metadata), which its quantizer uses to keep the head in fp32.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from vlmguard.guards import TensorSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
EXTERNAL_DATA_THRESHOLD = 1024  # bytes: every weight tensor above this goes to <file>_data
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata: the module path the op ran in


def _dynamic_shapes(specs: list[TensorSpec]) -> list[dict[int, object]]:
    """torch.export dynamic shapes: every named axis dynamic, every numbered one static."""
    return [
        {axis: Dim.DYNAMIC for axis, dim in enumerate(spec.dims) if isinstance(dim, str)}
        for spec in specs
    ]


def _name_dims(model: onnx.ModelProto, specs: list[TensorSpec], values: list) -> None:
    """Replace the exporter's symbolic dims (s37, ...) with our axis names."""
    by_name = {spec.name: spec for spec in specs}
    for value in values:
        spec = by_name[value.name]
        shape = value.type.tensor_type.shape
        for dim, want in zip(shape.dim, spec.dims, strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def _scope_node_names(model: onnx.ModelProto) -> None:
    """Name each node by its module path, as `/head/node_Sub_7`, and drop the debug metadata."""
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
        # stack traces and fx nodes: about 1.3 kB a node, a quarter of the detector's file
        del node.metadata_props[:]
        if scopes is None:
            continue
        # ['', 'module.tower', 'module.tower.model', ..., 'op']: root, module calls, the op
        # (`module.` is _Flat's attribute; it may or may not appear as a scope of its own)
        path = [scope.removeprefix("module") for scope in ast.literal_eval(scopes)[1:-1]]
        module = path[-1].strip(".").replace(".", "/") if path else ""
        node.name = f"/{module}/{node.name}" if module else f"/{node.name}"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep torch.onnx's progress prints and warnings ('torchvision is not installed') quiet."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: list[torch.Tensor],
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    path: Path,
    external_data: bool = True,
    scope_node_names: bool = False,
) -> Path:
    """Export `module(*example_inputs)` to `path`, weights in `<file>_data` or inline."""
    names = [spec.name for spec in inputs]
    with _quiet_exporter():
        program = torch.onnx.export(
            _Flat(module),
            tuple(example_inputs),
            dynamo=True,
            input_names=names,
            output_names=[spec.name for spec in outputs],
            dynamic_shapes=(tuple(_dynamic_shapes(inputs)),),  # one entry: the *tensors
            verbose=False,
        )
    model = program.model_proto
    _name_dims(model, inputs, list(model.graph.input))
    _name_dims(model, outputs, list(model.graph.output))
    if scope_node_names:
        _scope_node_names(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(model, path, external_data)
    return path


def _save(model: onnx.ModelProto, path: Path, external_data: bool = True) -> None:
    """Save with every weight above the threshold in `<file>_data` (or inline), then check it."""
    data_name = path.name + "_data"
    (path.parent / data_name).unlink(missing_ok=True)
    if not external_data:
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        return
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=EXTERNAL_DATA_THRESHOLD,
    )
    onnx.checker.check_model(str(path))


def convert_to_fp16(path: Path) -> Path:
    """Rewrite an fp32 graph as `<name>_fp16.onnx` (fp16 weights and IO), dropping the fp32 one."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(
        onnx.load(str(path)), keep_io_types=False, disable_shape_infer=True
    )
    OnnxModel(model).topological_sort()  # the converter appends its casts out of order
    target = path.with_name(f"{path.stem}_fp16.onnx")
    _save(model, target)
    path.unlink()
    path.with_name(path.name + "_data").unlink(missing_ok=True)
    return target


class _Flat(torch.nn.Module):
    """Present a module as taking flat positional tensors, so input names map one to one."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward the flat tensors to the wrapped module's `flat_forward`."""
        result = self.module.flat_forward(*tensors)
        return result if isinstance(result, tuple) else (result,)
