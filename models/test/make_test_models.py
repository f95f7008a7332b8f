"""Writes the tiny ONNX models the tests use (a few hundred bytes each, weights chosen by
hand so the outputs are known). Run from the repository root:

    .venv/bin/pip install onnx numpy onnxruntime
    .venv/bin/python models/test/make_test_models.py

Both models have a dynamic batch dimension. Inputs are expected normalised to 0..1
(catalog: mean 0, std 255).

ordinal-brightness.onnx  [N, 3, 8, 8] -> [N, 4] logits over grades poor < fair < good < excellent.
    m = mean of all pixels (0..1); logit_i = s * (3 * m * i - i^2 / 2) with s = 10, i.e. a
    Gaussian around grade 3m: black is "poor", white "excellent", m = 1/2 sits between
    "fair" and "good".

yolov8-quadrants.onnx    [N, 3, 64, 64] -> [N, 6, 4], the Ultralytics YOLOv8 layout
    (rows cx, cy, w, h, then class scores after sigmoid) with 4 anchors, one per 32x32
    quadrant of the input: the box is the quadrant (centre (16|48, 16|48), 32x32); with
    (R, G, B) the quadrant's mean colour, score("red") = sigmoid(10R - 5G - 5B - 2) and
    score("blue") = sigmoid(-5R - 5G + 10B - 2).
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = [helper.make_opsetid("", 17)]


def save(graph, name):
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="kinsight-tests")
    model.ir_version = 8  # readable by every ONNX Runtime since 1.10
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(HERE, name))


def ordinal():
    s = 10.0
    grades = np.arange(4, dtype=np.float32)
    # Gemm over the per-channel means: each channel contributes a third of m.
    weights = np.tile((s * grades)[None, :], (3, 1)).astype(np.float32)  # 3m * s * i / 3
    bias = (-s * grades**2 / 2).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["means"], axis=1),
            helper.make_node("Gemm", ["means", "weights", "bias"], ["logits"]),
        ],
        "ordinal-brightness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    save(graph, "ordinal-brightness.onnx")


def yolov8():
    class_weights = np.array([[10, -5, -5], [-5, -5, 10]], dtype=np.float32)
    class_bias = np.full((2, 1), -2.0, dtype=np.float32)
    # Anchors in row-major quadrant order: top-left, top-right, bottom-left, bottom-right.
    boxes = np.array(
        [[[16, 48, 16, 48], [16, 16, 48, 48], [32, 32, 32, 32], [32, 32, 32, 32]]],
        dtype=np.float32,
    )
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
            helper.make_node("Reshape", ["pooled", "cells_shape"], ["cells"]),  # [N, 3, 4]
            helper.make_node("MatMul", ["class_weights", "cells"], ["class_logits"]),  # [N, 2, 4]
            helper.make_node("Add", ["class_logits", "class_bias"], ["class_biased"]),
            helper.make_node("Sigmoid", ["class_biased"], ["scores"]),
            # Boxes are constant; multiplying a function of the input by 0 gives them the batch.
            helper.make_node("ReduceSum", ["cells", "channel_axis"], ["summed"], keepdims=1),  # [N, 1, 4]
            helper.make_node("Mul", ["summed", "zero"], ["zeros"]),
            helper.make_node("Add", ["zeros", "boxes"], ["box_rows"]),  # [N, 4, 4]
            helper.make_node("Concat", ["box_rows", "scores"], ["output0"], axis=1),
        ],
        "yolov8-quadrants",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 6, 4])],
        [
            numpy_helper.from_array(np.array([0, 3, 4], dtype=np.int64), "cells_shape"),
            numpy_helper.from_array(class_weights, "class_weights"),
            numpy_helper.from_array(class_bias, "class_bias"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "channel_axis"),
            numpy_helper.from_array(np.array(0, dtype=np.float32), "zero"),
            numpy_helper.from_array(boxes, "boxes"),
        ],
    )
    save(graph, "yolov8-quadrants.onnx")


def check():
    """Runs both models on known inputs with onnxruntime, when it is installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(os.path.join(HERE, "ordinal-brightness.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([np.full((3, 8, 8), v, dtype=np.float32) for v in (0.0, 1.0, 2 / 3)])
    logits = sess.run(None, {"image": batch})[0]
    assert logits.shape == (3, 4)
    assert logits.argmax(axis=1).tolist() == [0, 3, 2], logits
    sess = ort.InferenceSession(os.path.join(HERE, "yolov8-quadrants.onnx"), providers=["CPUExecutionProvider"])
    image = np.zeros((1, 3, 64, 64), dtype=np.float32)
    image[0, 0, :32, :32] = 1.0  # red top-left quadrant
    out = sess.run(None, {"images": image})[0]
    assert out.shape == (1, 6, 4)
    assert out[0, :4, 0].tolist() == [16, 16, 32, 32], out
    assert out[0, 4, 0] > 0.99 and out[0, 4, 1] < 0.2 and out[0, 5, 0] < 0.01, out
    print("checked with onnxruntime", ort.__version__)


if __name__ == "__main__":
    ordinal()
    yolov8()
    check()
