"""Tiny ONNX models in the layout of the InsightFace engine's three real ones, built in code.

Same input and output names and shapes as SCRFD (det_10g), ArcFace (w600k_r50) and
inswapper_128, saved at an IR version this onnxruntime accepts. The detector's weights are set
by hand so that it fires on red 8x8 squares (``red_cells`` draws them), which makes its
decoding checkable exactly; the recognition and swapper weights are random.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Landmark offsets (in stride units) the hand-set detector emits around each anchor centre.
KPS_OFFSETS = np.array([[-1.5, -1.2], [1.5, -1.2], [0.0, 0.3], [-1.2, 1.8], [1.2, 1.8]], np.float32)
BOX_DISTANCE = 4.0  # stride units on every side: a 64 px box at stride 8


def _save(graph, path) -> str:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    # onnx 1.23 writes IR 14, which this onnxruntime refuses (max 13); 10 covers opset 13.
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def build_scrfd(path) -> str:
    """SCRFD layout, 3 strides x 2 anchors: scores, boxes, landmarks, each (N, k).

    Stride 8 scores red cells: logit = 40 * (mean R - mean G) - 20 on the normalised input, so
    an all-red 8x8 cell scores ~1 and anything grey, black or skin-free scores ~0. The box and
    landmark heads are constant (bias only). Strides 16 and 32 never fire.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    heads = {"score": 1, "bbox": 4, "kps": 10}
    for head, width in heads.items():
        for stride in (8, 16, 32):
            name = f"{head}_{stride}"
            weight = np.zeros((2 * width, 3, stride, stride), np.float32)
            bias = np.zeros(2 * width, np.float32)
            if head == "score":
                bias[:] = -20.0
                if stride == 8:
                    weight[:, 0] = 40.0 / (stride * stride)
                    weight[:, 1] = -40.0 / (stride * stride)
            elif head == "bbox":
                bias[:] = BOX_DISTANCE
            else:
                bias[:] = np.tile(KPS_OFFSETS.reshape(-1), 2)
            inits += [
                numpy_helper.from_array(weight, f"{name}_w"),
                numpy_helper.from_array(bias, f"{name}_b"),
                numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape"),
            ]
            nodes += [
                helper.make_node(
                    "Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_conv"], strides=[stride, stride]
                ),
                helper.make_node("Transpose", [f"{name}_conv"], [f"{name}_t"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [f"{name}_r"]),
            ]
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [f"{name}_r"], [name]))
            else:
                nodes.append(helper.make_node("Identity", [f"{name}_r"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(
        nodes,
        "scrfd_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        outputs,
        inits,
    )
    return _save(graph, path)


def build_arcface(path, rng) -> str:
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 512)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=512).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input.1"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
        inits,
    )
    return _save(graph, path)


def build_inswapper(path, rng) -> str:
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(512, 3)).astype(np.float32), "style_w"),
        numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "style_shape"),
        # Last initializer, unused by the graph, as in the released model: the identity projection.
        numpy_helper.from_array(rng.normal(size=(512, 512)).astype(np.float32), "emap"),
    ]
    nodes = [
        helper.make_node("Conv", ["target", "conv_w"], ["conv"]),
        helper.make_node("MatMul", ["source", "style_w"], ["style"]),
        helper.make_node("Reshape", ["style", "style_shape"], ["style4"]),
        helper.make_node("Add", ["conv", "style4"], ["mix"]),
        helper.make_node("Sigmoid", ["mix"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "inswapper_tiny",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        inits,
    )
    return _save(graph, path)


def build_face_models(
    root: Path,
    names: tuple[str, str, str] = ("det_10g.onnx", "w600k_r50.onnx", "inswapper_128.onnx"),
    seed: int = 6,
) -> dict[str, str]:
    """The three models under ``root``: {"detector", "recognition", "swapper"} -> path."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return {
        "detector": build_scrfd(root / names[0]),
        "recognition": build_arcface(root / names[1], rng),
        "swapper": build_inswapper(root / names[2], rng),
    }


def red_cells(cells: list[tuple[int, int]], size=(480, 640)) -> np.ndarray:
    """A grey-and-texture picture with one red 8x8 block on each given stride-8 cell (col, row)."""
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(128, 30, (*size, 3)), 0, 255).astype(np.uint8)
    image[..., 0] = image[..., 1]  # no red dominance anywhere but in the blocks
    for col, row in cells:
        image[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = (255, 0, 0)
    return image
