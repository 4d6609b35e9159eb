"""INT8 quantization of ONNX models with ONNX Runtime's tooling, and the held-out accuracy check.

Quantization runs where the plaintext model already is (the model owner's machine or the TEE),
before sealing: the quantized model is written to ``dst`` only (mode 0600); intermediate files
live in a private temporary directory that is deleted afterwards, or, after a SIGKILL, by the
next quantisation (:mod:`._quant_workspace`). (ORT's calibration step writes an FP32 copy
augmented with min/max outputs into a private ``ort.quant.*`` temporary directory of its own,
inside that one.)

Calibration and evaluation files (``.npy`` / ``.npz``, read with ``allow_pickle=False``)::

    .npy   one array: the inputs of a model with exactly one input.
    .npz   one array per model input, named after the input; or a single array (any name)
           for a model with one input. An evaluation file adds ``labels``: integer class
           ids, shape (N,).

Every array stacks N samples along axis 0 (the batch axis); the other axes must equal the
model input's fixed dimensions (symbolic ones accept anything) and the dtype must convert to the
input's element type within its kind (float64 -> float32 is fine, float -> int is not). All inputs
carry the same N. A model whose batch axis is fixed to k is fed k samples at a time.

Accuracy is top-1 on the first model output: class scores (N, C) are arg-maxed, labels (N,)
are compared directly. Calibration and evaluation samples must not overlap, so the accuracy
reported is on held-out data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import stat
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast, get_args

import numpy as np
import onnx
from numpy.typing import NDArray

from enclaveml._files import write_atomically
from enclaveml.errors import ConfigurationError
from enclaveml.serving._quant_workspace import private_workspace

__all__ = [
    "ArrayInputs",
    "CalibrationSource",
    "EvaluationSource",
    "QuantizationReport",
    "evaluate_accuracy",
    "load_arrays",
    "quantize_model",
]

ArrayInputs: TypeAlias = NDArray[Any] | Mapping[str, NDArray[Any]]
"""One array for a single-input model, or arrays keyed by input name; samples along axis 0."""
CalibrationSource: TypeAlias = str | os.PathLike[str] | ArrayInputs
"""A ``.npy`` / ``.npz`` file (format in the module docstring) or the arrays themselves."""
EvaluationSource: TypeAlias = str | os.PathLike[str] | tuple[ArrayInputs, NDArray[Any]]
"""An ``.npz`` file with the inputs and ``labels``, or an ``(inputs, labels)`` pair."""
Method = Literal["static", "dynamic"]
QuantFormatName = Literal["qdq", "qoperator"]
IntType = Literal["uint8", "int8"]
LABELS = "labels"

# IR 10 (onnx 1.16, opset 21) loads in every onnxruntime we support (>= 1.19); onnx 1.23 stamps
# IR 14 on the models it builds, which onnxruntime 1.31 rejects (it loads up to 13).
_PORTABLE_IR_VERSION = 10
_QUANT_OP_PREFIXES = ("Quantize", "Dequantize", "DynamicQuantize", "QLinear", "QGemm")
_DEFAULT_BATCH = 32
Arrays: TypeAlias = dict[str, NDArray[Any]]


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_model` produced: sizes, the integer operators and accuracy before/after."""

    source: str
    destination: str
    method: Method
    quant_format: str
    per_channel: bool
    activation_type: str
    weight_type: str
    fp32_bytes: int
    int8_bytes: int
    ir_version: int
    calibration_samples: int
    eval_samples: int
    fp32_accuracy: float | None
    int8_accuracy: float | None
    seconds: float
    quantized_ops: dict[str, int] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        """INT8 size over FP32 size (about 0.25 for a model made mostly of weights)."""
        return self.int8_bytes / self.fp32_bytes

    @property
    def accuracy_change(self) -> float | None:
        """INT8 minus FP32 top-1 accuracy, as a fraction; negative when INT8 lost accuracy."""
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        return self.int8_accuracy - self.fp32_accuracy

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, the derived size ratio and accuracy change included."""
        return {**asdict(self), "size_ratio": self.size_ratio, "accuracy_change": self.accuracy_change}


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype[Any]
    dims: tuple[int | None, ...]  # None: symbolic or unknown


def quantize_model(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    calibration: CalibrationSource | None,
    method: Method = "static",
    per_channel: bool = False,
    activation_type: IntType = "uint8",
    weight_type: IntType = "int8",
    quant_format: QuantFormatName = "qdq",
    evaluation: EvaluationSource | None = None,
    batch_size: int = _DEFAULT_BATCH,
    threads: int | None = None,
) -> QuantizationReport:
    """Quantize the FP32 ONNX model ``src`` to INT8 and write it to ``dst``.

    ``method="static"`` calibrates activation ranges (min/max) on ``calibration`` and writes QDQ
    (or QOperator) nodes that ORT's CPU kernels run as integer convolutions and matrix products;
    ``"dynamic"`` quantizes weights only and measures activation ranges at run time (no
    calibration, uint8 activations; on convolutional models usually slower than FP32). With
    ``evaluation``, FP32 and INT8 top-1 accuracy are measured on it; it must share no sample with
    the calibration set. ``batch_size`` samples go through ORT per run, unless the model fixes its
    batch axis. Bad arguments, data files or models raise :class:`ConfigurationError`, and then
    nothing is written.
    """
    started = time.perf_counter()
    source, destination = Path(src), Path(dst)
    _check_options(method, quant_format, activation_type, weight_type, batch_size, calibration)
    if destination.resolve() == source.resolve():
        raise ConfigurationError("the output path must differ from the input model")
    if not destination.parent.is_dir():
        raise ConfigurationError(f"output directory {destination.parent} does not exist")
    fp32 = _load_model(source)
    specs = _input_specs(fp32)
    calib = None if calibration is None else _bind(_arrays_from(calibration), specs, "calibration data")
    calib_batch = 0 if calib is None else _batch_for(specs, calib, batch_size)
    eval_set = None if evaluation is None else _evaluation_from(evaluation, specs)
    if calib is not None and eval_set is not None:
        _check_disjoint(calib, eval_set[0])
    fp32.ir_version = _loadable_ir_version(fp32)  # ORT's pre-processing runs the model: it must load
    fp32_bytes = fp32.SerializeToString()
    ort_q = _ort_quantization()
    with private_workspace() as tmp:
        original, prepared, quantized = (Path(tmp) / n for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        write_atomically(original, fp32_bytes, durable=False)  # 0600
        # ORT 1.31's per-channel bias check fails on 2-D Gemm biases (skl2onnx models): say what to try.
        hint = " with per-channel weights (try per-tensor)" if per_channel else ""
        with _translating(f"ONNX Runtime could not quantize {source}{hint}"):
            # ONNX shape inference and BN folding. Not ORT's symbolic shape inference: where it
            # cannot finish (ai.onnx.ml operators, as skl2onnx writes) it saves a plaintext copy of
            # the model as sym_shape_infer_temp.onnx in the working directory, and raises a bare
            # Exception. ONNX's own inference gives the same shapes on convolutional networks
            # (ResNet-50: 121 of the 122 value infos, the graph output aside).
            ort_q.quant_pre_process(str(original), str(prepared), skip_symbolic_shape=True)
            if calib is None:
                ort_q.quantize_dynamic(
                    str(prepared), str(quantized), per_channel=per_channel, weight_type=_qtype(weight_type)
                )
            else:
                ort_q.quantize_static(
                    str(prepared),
                    str(quantized),
                    _BatchReader(calib, calib_batch),
                    quant_format=getattr(ort_q.QuantFormat, "QDQ" if quant_format == "qdq" else "QOperator"),
                    per_channel=per_channel,
                    activation_type=_qtype(activation_type),
                    weight_type=_qtype(weight_type),
                )
            model = onnx.load(str(quantized))
    counts = _quantized_op_counts(model)
    if not counts:
        raise ConfigurationError(f"ONNX Runtime found no operator to quantize in {source}; nothing written")
    model.ir_version = _loadable_ir_version(model)
    int8_bytes = model.SerializeToString()
    int8_session = _session(int8_bytes, threads, f"the quantized model of {source}")
    fp32_acc = int8_acc = None
    if eval_set is not None:
        fp32_acc = _accuracy(_session(fp32_bytes, threads, str(source)), specs, *eval_set, batch_size)
        int8_acc = _accuracy(int8_session, specs, *eval_set, batch_size)
    _write_private(destination, int8_bytes)
    return QuantizationReport(
        source=str(source),
        destination=str(destination),
        method=method,
        quant_format="integer ops" if method == "dynamic" else quant_format,
        per_channel=per_channel,
        activation_type="uint8" if method == "dynamic" else activation_type,
        weight_type=weight_type,
        fp32_bytes=len(fp32_bytes),
        int8_bytes=len(int8_bytes),
        ir_version=model.ir_version,
        calibration_samples=0 if calib is None else _count(calib),
        eval_samples=0 if eval_set is None else len(eval_set[1]),
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        seconds=time.perf_counter() - started,
        quantized_ops=counts,
    )


def evaluate_accuracy(
    model_path: str | os.PathLike[str],
    inputs: ArrayInputs,
    labels: NDArray[Any],
    *,
    batch_size: int = _DEFAULT_BATCH,
    threads: int | None = None,
) -> float:
    """Top-1 accuracy (0..1) of the ONNX model at ``model_path`` on ``inputs`` against ``labels``."""
    path = Path(model_path)
    model = _load_model(path)
    specs = _input_specs(model)
    bound = _bind(_arrays_from(inputs), specs, "evaluation inputs")
    model.ir_version = _loadable_ir_version(model)
    session = _session(model.SerializeToString(), threads, str(path))
    return _accuracy(session, specs, bound, _labels(labels, bound), batch_size)


def load_arrays(path: str | os.PathLike[str]) -> Arrays:
    """Read a ``.npy`` (as one array named ``""``) or ``.npz`` file, never unpickling anything."""
    file = Path(path)
    if file.suffix not in (".npy", ".npz"):
        raise ConfigurationError(f"{file}: data files must be .npy or .npz, not '{file.suffix}'")
    try:
        loaded = np.load(file, allow_pickle=False)  # a pickle in a data file could run code
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded:
            return {name: np.asarray(loaded[name]) for name in loaded.files}
    except OSError as exc:
        raise ConfigurationError(f"cannot read {file}: {exc.strerror or exc}") from exc
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # not numpy, truncated, or pickled objects
        raise ConfigurationError(f"{file} is not a readable numpy file without pickles: {exc}") from exc


class _BatchReader:
    """ORT's ``CalibrationDataReader`` protocol (ORT accepts any object with ``get_next``)."""

    def __init__(self, arrays: Arrays, batch: int) -> None:
        self._batches = (
            {k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, _count(arrays), batch)
        )

    def get_next(self) -> Arrays | None:
        return next(self._batches, None)


def _check_options(
    method: str, quant_format: str, activation: str, weight: str, batch_size: int, calibration: object
) -> None:
    # The Literal types guard typed callers; these guard everyone else (a typo must not pick a default).
    for name, value, allowed in (
        ("method", method, get_args(Method)),
        ("quant_format", quant_format, get_args(QuantFormatName)),
        ("activation_type", activation, get_args(IntType)),
        ("weight_type", weight, get_args(IntType)),
    ):
        if value not in allowed:
            raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}; not {value!r}")
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    if method == "static" and calibration is None:
        raise ConfigurationError("static quantization needs calibration data (or use method='dynamic')")
    if method == "dynamic" and (calibration is not None or activation != "uint8"):
        raise ConfigurationError("dynamic quantization takes no calibration data and only uint8 activations")


def _load_model(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))  # external weights included: the model is re-serialised whole
    except OSError as exc:
        raise ConfigurationError(f"cannot read model {path}: {exc.strerror or exc}") from exc
    except (_decode_error(), onnx.checker.ValidationError) as exc:
        # ValidationError: external-data references that are missing or point outside the directory.
        raise ConfigurationError(f"{path} is not an ONNX model that can be loaded: {exc}") from exc
    if not model.graph.node or not model.opset_import:  # an empty file parses as an empty model
        raise ConfigurationError(f"{path} is not an ONNX model (no graph)")
    return model


def _input_specs(model: onnx.ModelProto) -> list[_InputSpec]:
    initialisers = {t.name for t in model.graph.initializer}  # old exporters list weights as inputs
    specs = []
    for value in model.graph.input:
        if value.name not in initialisers:
            tensor = value.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            specs.append(_InputSpec(value.name, dtype, dims))
    return specs


def _arrays_from(source: CalibrationSource) -> Arrays:
    if isinstance(source, str | os.PathLike):
        return load_arrays(source)
    return dict(source) if isinstance(source, Mapping) else {"": source}


def _evaluation_from(source: EvaluationSource, specs: list[_InputSpec]) -> tuple[Arrays, NDArray[Any]]:
    if isinstance(source, tuple):
        arrays, labels = _arrays_from(source[0]), source[1]
    else:
        arrays = load_arrays(source)
        if LABELS not in arrays:
            raise ConfigurationError(f"evaluation file {source} has no '{LABELS}' array")
        labels = arrays.pop(LABELS)
    bound = _bind(arrays, specs, "evaluation data")
    return bound, _labels(labels, bound)


def _bind(arrays: Arrays, specs: list[_InputSpec], what: str) -> Arrays:
    """Match arrays to model inputs by name (or the lone array to the lone input) and check them."""
    names = [s.name for s in specs]
    if len(arrays) == 1 and len(specs) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing, unexpected = set(names) - set(arrays), set(arrays) - set(names)
    if missing or unexpected:
        raise ConfigurationError(
            f"{what} must hold one array per model input {names}: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    bound: Arrays = {}
    for spec in specs:
        array, where = arrays[spec.name], f"{what} for input '{spec.name}'"
        fits = array.ndim == len(spec.dims) > 0 and all(
            w in (None, g) for g, w in zip(array.shape[1:], spec.dims[1:], strict=True)
        )
        if not fits:
            raise ConfigurationError(
                f"{where} has shape {array.shape}; the model takes {_show(spec.dims)} (samples along axis 0)"
            )
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise ConfigurationError(f"{where} is {array.dtype}; the model takes {spec.dtype}")
        bound[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
    if len({len(a) for a in bound.values()}) != 1 or _count(bound) == 0:
        raise ConfigurationError(f"{what}: every input needs the same, non-zero number of samples")
    return bound


def _labels(labels: NDArray[Any], inputs: Arrays) -> NDArray[Any]:
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu" or len(array) != _count(inputs):
        raise ConfigurationError(
            f"labels must be integer class ids of shape ({_count(inputs)},), not {array.dtype} {array.shape}"
        )
    return array


def _check_disjoint(calibration: Arrays, evaluation: Arrays) -> None:
    """Refuse evaluation samples that also calibrated the model: the accuracy would not be held-out."""
    seen = set(_sample_digests(calibration))
    if shared := sum(1 for d in _sample_digests(evaluation) if d in seen):
        raise ConfigurationError(f"{shared} evaluation samples also appear in the calibration data")


def _sample_digests(arrays: Arrays) -> Iterator[bytes]:
    for i in range(_count(arrays)):
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(arrays):
            digest.update(arrays[name][i].tobytes())
        yield digest.digest()


def _batch_for(specs: list[_InputSpec], arrays: Arrays, default: int) -> int:
    """A fixed batch axis dictates the batch size; otherwise ``default`` samples per run."""
    fixed = {s.dims[0] for s in specs if s.dims[0] is not None}
    if len(fixed) > 1:
        raise ConfigurationError(f"the model's inputs disagree on their fixed batch size: {sorted(fixed)}")
    batch = int(fixed.pop()) if fixed else default
    if fixed and _count(arrays) % batch:
        raise ConfigurationError(f"the model takes batches of {batch}: give a multiple of {batch} samples")
    return batch


def _accuracy(
    session: Any, specs: list[_InputSpec], inputs: Arrays, labels: NDArray[Any], batch: int
) -> float:
    batch, correct = _batch_for(specs, inputs, batch), 0
    for i in range(0, len(labels), batch):
        with _translating("ONNX Runtime failed on the evaluation data"):
            first = np.asarray(session.run(None, {k: v[i : i + batch] for k, v in inputs.items()})[0])
        if not (
            (first.ndim == 2 and first.dtype.kind == "f") or (first.ndim == 1 and first.dtype.kind in "iu")
        ):
            raise ConfigurationError(
                f"the model's first output is {first.dtype} {first.shape}: need scores (N, C) or labels (N,)"
            )
        predicted = first.argmax(axis=1) if first.ndim == 2 else first
        correct += int((predicted == labels[i : i + batch]).sum())
    return correct / len(labels)


def _quantized_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type.startswith(_QUANT_OP_PREFIXES) or node.op_type.endswith("Integer"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _loadable_ir_version(model: onnx.ModelProto) -> int:
    """Keep the IR version unless it is newer than ORT loads; never below what the opsets need."""
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(min(model.ir_version, _PORTABLE_IR_VERSION), needed)


def _write_private(path: Path, data: bytes) -> None:
    """Write the model readable by its owner only (a plaintext model is what sealing protects).

    A file is written atomically: a failed write leaves whatever was at ``path`` as it was, and a
    hard link to the input is replaced, not written through; a symbolic link's target is the file
    replaced. A pipe or device (``-o /dev/stdout``, ``-o >(cmd)``) is written through, as a stream.
    """
    try:
        try:
            status = os.stat(path)
        except FileNotFoundError:
            status = None
        if status is not None and not stat.S_ISREG(status.st_mode):
            with open(path, "wb") as stream:
                stream.write(data)
            return
        write_atomically(Path(os.path.realpath(path)), data, mode=0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _session(model: bytes, threads: int | None, what: str) -> Any:
    ort = importlib.import_module("onnxruntime")
    options = ort.SessionOptions()
    # Size the pool to the cores this process may use: oversubscribed pools collapse under contention.
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    with _translating(f"ONNX Runtime cannot load {what}"):
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _qtype(name: IntType) -> Any:
    return getattr(_ort_quantization().QuantType, "QUInt8" if name == "uint8" else "QInt8")


def _ort_quantization() -> Any:
    """ONNX Runtime ships no type information (no py.typed), so its API is handled as ``Any`` here."""
    return importlib.import_module("onnxruntime.quantization")


@functools.cache
def _decode_error() -> type[Exception]:
    """protobuf's parse error, which ``onnx.load`` raises on a file that is not a model (untyped)."""
    return cast(type[Exception], importlib.import_module("google.protobuf.message").DecodeError)


@functools.cache
def _ort_errors() -> tuple[type[Exception], ...]:
    """ORT's native exceptions derive from Exception only; its Python tools raise the usual ones."""
    native = vars(importlib.import_module("onnxruntime.capi.onnxruntime_pybind11_state")).values()
    own = tuple(c for c in native if isinstance(c, type) and issubclass(c, Exception))
    return (*own, _decode_error(), ValueError, RuntimeError, TypeError, KeyError, IndexError)


@contextlib.contextmanager
def _translating(message: str) -> Iterator[None]:
    """Turn ONNX Runtime and onnx failures into ConfigurationError at this boundary (cause kept)."""
    try:
        yield
    except ConfigurationError:
        raise
    except _ort_errors() as exc:
        raise ConfigurationError(f"{message}: {exc}") from exc


def _count(arrays: Arrays) -> int:
    return len(next(iter(arrays.values())))


def _show(dims: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in dims) + ")"
