"""INT8 quantization on a small real classifier: an sklearn MLP trained on the bundled digits data.

The model is converted with skl2onnx; calibration and evaluation sets are disjoint slices of the
digits images the model was not trained on.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import typer
from numpy.typing import NDArray
from typer.testing import CliRunner

from enclaveml.cli.quantize import quantize
from enclaveml.errors import ConfigurationError
from enclaveml.serving.quantize import QuantizationReport, evaluate_accuracy, quantize_model

# onnxruntime, sklearn, threadpoolctl and skl2onnx ship no type information: they are used as Any.
ort: Any = importlib.import_module("onnxruntime")
sklearn_datasets: Any = importlib.import_module("sklearn.datasets")
sklearn_exceptions: Any = importlib.import_module("sklearn.exceptions")
sklearn_mlp: Any = importlib.import_module("sklearn.neural_network")
threadpoolctl: Any = importlib.import_module("threadpoolctl")


@dataclass(frozen=True)
class Digits:
    model: Path
    calibration: NDArray[np.float32]
    eval_x: NDArray[np.float32]
    eval_y: NDArray[np.int64]
    sklearn_accuracy: float


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype(np.int64)
    # One BLAS thread: on a busy 2-core machine a threaded BLAS makes this 1 s fit take 8 s.
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
        # Not fully converged after 200 steps, and over 95% accurate on the held-out digits.
        warnings.simplefilter("ignore", sklearn_exceptions.ConvergenceWarning)
        clf = sklearn_mlp.MLPClassifier((128,), max_iter=200, random_state=0).fit(x[:1000], y[:1000])
    to_onnx: Callable[..., onnx.ModelProto] = importlib.import_module("skl2onnx").to_onnx
    model = to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=17)  # outputs: label, probabilities
    path = tmp_path_factory.mktemp("digits") / "mlp.onnx"
    onnx.save(model, str(path))
    return Digits(path, x[1000:1100], x[1100:], y[1100:], float(clf.score(x[1100:], y[1100:])))


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _loads_in_ort(path: Path) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"X": np.zeros((2, 64), np.float32)})[0].shape == (2,)


def test_static_qdq_is_smaller_integer_and_keeps_accuracy(digits: Digits, tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    out.write_bytes(b"old")
    out.chmod(0o644)  # an existing file is overwritten and made private too
    report = quantize_model(
        digits.model, out, calibration=digits.calibration, evaluation=(digits.eval_x, digits.eval_y)
    )
    _loads_in_ort(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert report.quantized_ops["DequantizeLinear"] >= 2
    assert report.int8_bytes == out.stat().st_size < report.fp32_bytes
    assert report.size_ratio < 0.5
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert (report.method, report.quant_format, report.activation_type, report.weight_type) == (
        "static",
        "qdq",
        "uint8",
        "int8",
    )
    assert report.calibration_samples == 100
    assert report.eval_samples == len(digits.eval_y)
    assert report.fp32_accuracy == pytest.approx(digits.sklearn_accuracy, abs=0.005)
    assert report.int8_accuracy is not None
    assert report.accuracy_change is not None
    assert abs(report.accuracy_change) < 0.03
    assert evaluate_accuracy(out, digits.eval_x, digits.eval_y) == report.int8_accuracy
    assert json.loads(json.dumps(report.to_dict()))["accuracy_change"] == report.accuracy_change


def test_dynamic_uses_integer_matmuls(digits: Digits, tmp_path: Path) -> None:
    out = tmp_path / "dyn.onnx"
    report = quantize_model(
        digits.model, out, calibration=None, method="dynamic", evaluation=(digits.eval_x, digits.eval_y)
    )
    _loads_in_ort(out)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= _ops(out)
    assert report.int8_bytes < report.fp32_bytes
    assert report.calibration_samples == 0
    assert report.accuracy_change is not None
    assert abs(report.accuracy_change) < 0.03


def test_files_and_qoperator_format(digits: Digits, tmp_path: Path) -> None:
    np.save(tmp_path / "calib.npy", digits.calibration)
    np.savez(tmp_path / "eval.npz", X=digits.eval_x, labels=digits.eval_y)
    report = quantize_model(
        digits.model,
        tmp_path / "q.onnx",
        calibration=tmp_path / "calib.npy",
        evaluation=tmp_path / "eval.npz",
        quant_format="qoperator",
    )
    assert report.eval_samples == len(digits.eval_y)
    assert any(op.startswith(("QLinear", "QGemm")) for op in report.quantized_ops)
    _loads_in_ort(tmp_path / "q.onnx")


def test_ir_version_onnx_123_default_is_lowered(digits: Digits, tmp_path: Path) -> None:
    model = onnx.load(str(digits.model))
    model.ir_version = 14  # what onnx 1.23 stamps on new models; onnxruntime 1.31 refuses it
    src = tmp_path / "ir14.onnx"
    onnx.save(model, str(src))
    report = quantize_model(src, tmp_path / "q.onnx", calibration={"X": digits.calibration})
    assert report.ir_version == onnx.load(str(tmp_path / "q.onnx")).ir_version <= 10
    _loads_in_ort(tmp_path / "q.onnx")
    assert evaluate_accuracy(src, {"X": digits.eval_x}, digits.eval_y) > 0.8


def _write(tmp_path: Path, name: str, writer: Callable[[Path], Any]) -> Path:
    path = tmp_path / name
    writer(path)
    return path


BAD_CALIBRATION: dict[str, tuple[str, Callable[[Path], Any], str]] = {
    "missing": ("none.npy", lambda p: None, "cannot read"),
    "suffix": ("calib.csv", lambda p: p.write_text("1,2\n"), r"\.npy or \.npz"),
    "not numpy": ("calib.npy", lambda p: p.write_bytes(b"hello"), "not a readable numpy file"),
    "truncated": ("calib.npy", lambda p: p.write_bytes(_npy_bytes()[:-7]), "not a readable numpy file"),
    "bad zip": ("calib.npz", lambda p: p.write_bytes(b"PK\x03\x04broken"), "not a readable numpy file"),
    "pickle": ("calib.npy", lambda p: np.save(p, np.array([{}], dtype=object)), "pickles"),
    "width": (
        "calib.npy",
        lambda p: np.save(p, np.zeros((4, 63), np.float32)),
        r"shape \(4, 63\).*\(N, 64\)",
    ),
    "rank": ("calib.npy", lambda p: np.save(p, np.zeros(64, np.float32)), r"shape \(64,\)"),
    "dtype": ("calib.npy", lambda p: np.save(p, np.full((4, 64), "a")), "<U1; the model takes float32"),
    "empty": ("calib.npy", lambda p: np.save(p, np.zeros((0, 64), np.float32)), "non-zero number"),
    "names": (
        "calib.npz",
        lambda p: np.savez(p, X=np.zeros((4, 64), np.float32), Y=np.zeros((4, 64), np.float32)),
        r"unexpected \['Y'\]",
    ),
}


def _npy_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 64), np.float32))
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(BAD_CALIBRATION))
def test_bad_calibration_is_a_configuration_error(digits: Digits, tmp_path: Path, case: str) -> None:
    name, writer, message = BAD_CALIBRATION[case]
    with pytest.raises(ConfigurationError, match=message):
        quantize_model(digits.model, tmp_path / "q.onnx", calibration=_write(tmp_path, name, writer))
    assert not (tmp_path / "q.onnx").exists()


def test_pickled_file_is_never_unpickled(digits: Digits, tmp_path: Path) -> None:
    path = tmp_path / "calib.npy"
    path.write_bytes(pickle.dumps(digits.calibration))  # np.load would unpickle this if allowed
    with pytest.raises(ConfigurationError, match="pickles"):
        quantize_model(digits.model, tmp_path / "q.onnx", calibration=path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"calibration": None}, "needs calibration data"),
        ({"method": "dynamic"}, "takes no calibration data"),
        ({"quant_format": "QDQ"}, "quant_format must be one of qdq, qoperator"),
        ({"weight_type": "int4"}, "weight_type must be one of"),
        ({"evaluation": "eval-shares"}, "2 evaluation samples also appear in the calibration data"),
        ({"evaluation": "eval-labels"}, "labels must be integer class ids"),
    ],
)
def test_bad_arguments(digits: Digits, tmp_path: Path, options: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {"calibration": digits.calibration, **options}
    if options.get("evaluation") == "eval-shares":
        kwargs["evaluation"] = (
            np.concatenate([digits.eval_x, digits.calibration[3:5]]),
            np.zeros(len(digits.eval_y) + 2, np.int64),
        )
    elif options.get("evaluation") == "eval-labels":
        kwargs["evaluation"] = (digits.eval_x, digits.eval_y.astype(np.float32))
    with pytest.raises(ConfigurationError, match=message):
        quantize_model(digits.model, tmp_path / "q.onnx", **kwargs)
    assert not (tmp_path / "q.onnx").exists()


def test_quantizer_failures_are_configuration_errors(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What ORT's tooling raises (here as ORT 1.31 does on a per-channel 2-D Gemm bias) must come
    # out as a ConfigurationError, cause kept, suggesting what to try; nothing is written.
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("The truth value of an array with more than one element is ambiguous.")

    monkeypatch.setattr(importlib.import_module("onnxruntime.quantization"), "quantize_static", broken)
    with pytest.raises(ConfigurationError, match=r"try per-tensor.*truth value") as caught:
        quantize_model(digits.model, tmp_path / "q.onnx", calibration=digits.calibration, per_channel=True)
    assert isinstance(caught.value.__cause__, ValueError)
    assert not (tmp_path / "q.onnx").exists()


def test_bad_model_and_paths(digits: Digits, tmp_path: Path) -> None:
    garbage = _write(tmp_path, "garbage.onnx", lambda p: p.write_bytes(b"\x08\x07not a model at all"))
    with pytest.raises(ConfigurationError, match="not an ONNX model"):
        quantize_model(garbage, tmp_path / "q.onnx", calibration=digits.calibration)
    with pytest.raises(ConfigurationError, match="must differ"):
        quantize_model(digits.model, digits.model, calibration=digits.calibration)
    with pytest.raises(ConfigurationError, match="does not exist"):
        quantize_model(digits.model, tmp_path / "no" / "q.onnx", calibration=digits.calibration)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(quantize)
    return app


def test_cli_json_and_table(digits: Digits, tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", X=digits.calibration)
    np.savez(tmp_path / "eval.npz", X=digits.eval_x, labels=digits.eval_y)
    model, out = str(digits.model), str(tmp_path / "q.onnx")
    common = [model, out, "--calibration", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz")]
    result = CliRunner().invoke(_cli(), [*common, "--json", "--max-drop", "5"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["accepted"]
    assert payload["eval_samples"] == len(digits.eval_y)
    assert abs(payload["accuracy_change"]) < 0.03
    assert payload["int8_bytes"] < payload["fp32_bytes"]
    table = CliRunner().invoke(_cli(), common)
    assert table.exit_code == 0
    assert "INT8 top-1" in table.output
    assert "points" in table.output


def test_cli_exit_codes(digits: Digits, tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((4, 3), np.float32))
    out = str(tmp_path / "q.onnx")
    bad = CliRunner().invoke(
        _cli(), [str(digits.model), out, "--calibration", str(tmp_path / "bad.npy"), "--json"]
    )
    assert bad.exit_code == 3
    assert "axis 0" in json.loads(bad.output)["error"]
    dynamic = CliRunner().invoke(_cli(), [str(digits.model), out, "--method", "dynamic"])
    assert dynamic.exit_code == 0
    assert "not measured" in dynamic.output
    np.savez(tmp_path / "eval.npz", X=digits.eval_x, labels=digits.eval_y)
    # A negative allowance demands an accuracy gain no quantizer delivers: the gate must trip.
    strict = [str(digits.model), out, "--method", "dynamic", "--eval", str(tmp_path / "eval.npz")]
    gated = CliRunner().invoke(_cli(), [*strict, "--max-drop", "-50", "--json"])
    assert gated.exit_code == 1
    assert json.loads(gated.output)["accepted"] is False


def test_report_is_a_frozen_value() -> None:
    report = QuantizationReport(
        "a", "b", "dynamic", "integer ops", False, "uint8", "int8", 100, 30, 8, 0, 0, None, None, 0.1
    )
    assert report.accuracy_change is None
    assert report.size_ratio == 0.3
    with pytest.raises(AttributeError):
        setattr(report, "method", "static")  # setattr: the type checker would refuse


def test_an_empty_model_or_one_whose_external_data_is_missing_is_a_configuration_error(
    digits: Digits, tmp_path: Path
) -> None:
    empty = _write(tmp_path, "empty.onnx", lambda p: p.write_bytes(b""))
    with pytest.raises(ConfigurationError, match="not an ONNX model"):
        quantize_model(empty, tmp_path / "q.onnx", calibration=None, method="dynamic")
    for location in ("missing.bin", "../outside.bin"):  # not there; outside the model's directory
        model = onnx.load(str(digits.model))
        tensor = model.graph.initializer[0]
        tensor.ClearField("float_data")
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)
        onnx.save(model, str(tmp_path / "ext.onnx"))
        with pytest.raises(ConfigurationError, match=r"that can be loaded|cannot read"):
            quantize_model(tmp_path / "ext.onnx", tmp_path / "q.onnx", calibration=digits.calibration)
    assert not (tmp_path / "q.onnx").exists()


def test_the_output_is_written_atomically_and_never_through_a_link_to_the_input(
    digits: Digits, tmp_path: Path
) -> None:
    source = tmp_path / "fp32.onnx"
    source.write_bytes(digits.model.read_bytes())
    link = tmp_path / "int8.onnx"
    os.link(source, link)  # the "output" is the input under another name
    quantize_model(source, link, calibration=digits.calibration)
    assert source.read_bytes() == digits.model.read_bytes()  # the FP32 input is untouched
    assert link.read_bytes() != source.read_bytes()
    assert stat.S_IMODE(link.stat().st_mode) == 0o600


def test_sigterm_during_quantization_leaves_no_copy_of_the_model_in_the_temporary_directory(
    digits: Digits, tmp_path: Path
) -> None:
    # ORT's pre-processing gets SIGTERM'd while the plaintext copies exist (as kill/timeout/systemd
    # would); the command unwinds and deletes them, its own and ORT's (pre.quant.*) alike.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = (
        "import os, signal, time, tempfile\n"
        "import enclaveml.serving.quantize as q\n"
        "real = q._ort_quantization()\n"
        "class Killed:\n"
        "    def __getattr__(self, name): return getattr(real, name)\n"
        "    def quant_pre_process(self, src, dst, **options):\n"
        "        tempfile.mkdtemp(prefix='pre.quant.')  # as ORT's own pre-processing does\n"
        "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
        "q._ort_quantization = lambda: Killed()\n"
        "from enclaveml.cli import main; main()\n"
    )
    args = ["quantize", str(digits.model), str(tmp_path / "q.onnx"), "--method", "dynamic"]
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "TMPDIR": str(scratch)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    # (".ses" is a 51-byte session id a dependency writes on import, nothing of the model.)
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == []
    assert not (tmp_path / "q.onnx").exists()


def test_concurrent_quantizations_keep_their_workspaces_apart(digits: Digits, tmp_path: Path) -> None:
    before = {p.name for p in Path(tempfile.gettempdir()).glob("enclaveml-quant-*")}
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            quantize_model(digits.model, tmp_path / f"q{index}.onnx", calibration=None, method="dynamic")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert all((tmp_path / f"q{i}.onnx").stat().st_size > 0 for i in range(3))
    assert tempfile.tempdir is None or Path(tempfile.tempdir).is_dir()
    assert {p.name for p in Path(tempfile.gettempdir()).glob("enclaveml-quant-*")} == before


def test_the_output_may_be_a_symbolic_link_or_a_pipe(digits: Digits, tmp_path: Path) -> None:
    target = tmp_path / "models" / "int8.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "latest.onnx"
    link.symlink_to(target)
    quantize_model(digits.model, link, calibration=None, method="dynamic")
    assert link.is_symlink()
    assert onnx.load(str(target)).graph.node  # the link's target holds the new model
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    quantize_model(digits.model, fifo, calibration=None, method="dynamic")
    reader.join(30)
    assert received
    assert received[0] == target.read_bytes()


def test_a_model_onnx_runtime_cannot_shape_leaves_no_copy_in_the_working_directory(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A linear classifier from skl2onnx is one ai.onnx.ml operator: ORT's symbolic shape inference
    # cannot finish on it and would save the plaintext model into the working directory.
    sklearn_linear: Any = importlib.import_module("sklearn.linear_model")
    to_onnx: Callable[..., onnx.ModelProto] = importlib.import_module("skl2onnx").to_onnx
    x = np.concatenate([digits.calibration, digits.eval_x])
    y = np.concatenate([np.arange(len(digits.calibration)) % 10, digits.eval_y])
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
        warnings.simplefilter("ignore", sklearn_exceptions.ConvergenceWarning)  # any fit will do
        clf = sklearn_linear.LogisticRegression(max_iter=50).fit(x, y)
    model = tmp_path / "linear.onnx"
    onnx.save(to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=17), str(model))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    with pytest.raises(ConfigurationError, match="could not quantize"):
        quantize_model(model, tmp_path / "q.onnx", calibration=digits.calibration)
    assert list(workdir.iterdir()) == []
    assert not (tmp_path / "q.onnx").exists()


def test_a_workspace_left_by_a_killed_quantisation_is_removed_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGKILL (the OOM killer) cannot unwind: the plaintext copies stayed in $TMPDIR for ever.
    import fcntl
    import tempfile

    from enclaveml.serving._quant_workspace import private_workspace

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    abandoned, running = tmp_path / "enclaveml-quant-killed", tmp_path / "enclaveml-quant-running"
    for directory in (abandoned, running):
        directory.mkdir(mode=0o700)
        (directory / ".running").touch()
        (directory / "fp32.onnx").write_bytes(b"plaintext model")
    other = tmp_path / "enclaveml-quant-older"  # without a lock file: not judged
    other.mkdir()
    killed_in_set_up, setting_up = tmp_path / ".enclaveml-quant-new-a", tmp_path / ".enclaveml-quant-new-b"
    killed_in_set_up.mkdir()
    setting_up.mkdir()
    os.utime(killed_in_set_up, (time.time() - 120, time.time() - 120))  # a run killed 2 minutes ago
    held = os.open(running / ".running", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # another process's quantisation, still running
    try:
        with private_workspace() as workspace:
            assert not abandoned.exists()
            assert not killed_in_set_up.exists()
            assert setting_up.exists()  # may be another run's, about to lock
            assert running.exists()
            assert other.exists()
            assert Path(workspace).parent == tmp_path
            assert tempfile.gettempdir() == workspace
        assert not Path(workspace).exists()
    finally:
        os.close(held)


def test_concurrent_quantisations_never_remove_each_others_live_workspace(tmp_path: Path) -> None:
    # A workspace was visible to another run's clean-up between its creation and its lock (that
    # run took the lock and removed it), and a workspace that vanished mid-scan raised.
    loop = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from enclaveml.serving._quant_workspace import private_workspace\n"
        "end, lost = time.monotonic() + 3, 0\n"
        "while time.monotonic() < end:\n"
        "    with private_workspace() as w:\n"
        "        Path(w, 'fp32.onnx').write_bytes(b'model')\n"
        "        lost += not Path(w, 'fp32.onnx').exists()\n"
        "print(lost)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    pipe = subprocess.PIPE
    command = [sys.executable, "-c", loop]
    runs = [subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe) for _ in range(3)]
    results = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err.decode()[-500:] for _, err in results]
    assert [int(out) for out, _ in results] == [0, 0, 0]
    assert [p.name for p in tmp_path.iterdir() if p.name != ".ses"] == []
