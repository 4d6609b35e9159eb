"""A small real classifier for serving tests: scikit-learn digits, exported with skl2onnx."""

from __future__ import annotations

import functools

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split


@functools.cache
def digits_model() -> tuple[bytes, np.ndarray, np.ndarray]:
    """(onnx bytes, held-out inputs float32 [n, 64], held-out labels)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    model = LogisticRegression(max_iter=300).fit(x_train, y_train)
    onx = to_onnx(model, x_train[:1], options={"zipmap": False}, target_opset=17)
    onx.ir_version = min(onx.ir_version, 10)
    return onx.SerializeToString(), x_test, y_test
