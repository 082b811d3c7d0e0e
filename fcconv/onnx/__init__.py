"""ONNX graphs: the head read off the graph and rewritten as convolutions
(:mod:`~fcconv.onnx.graph`), checked in onnxruntime (:mod:`~fcconv.onnx.check`), and
PyTorch models written as ONNX (:mod:`~fcconv.onnx.export`). Needs ``fcconv[onnx]``."""
