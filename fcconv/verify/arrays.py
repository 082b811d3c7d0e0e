"""Tensors as numpy arrays in their own dtype, so the checks never need torch.

numpy holds float16, float32 and float64 itself; bfloat16 and the float8
formats come from ``ml_dtypes`` (the dtypes JAX and ONNX use), whose values
widen to float64 exactly. A torch tensor is viewed through its bits, so no
value is rounded on the way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

_NATIVE = ("float16", "float32", "float64")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a float dtype as torch names it (``bfloat16``, ``float8_e4m3fn``).

    >>> str(numpy_dtype("float32")), str(numpy_dtype("bfloat16"))
    ('float32', 'bfloat16')
    """
    import numpy as np

    if name in _NATIVE:
        return np.dtype(name)
    import ml_dtypes

    kind = getattr(ml_dtypes, name, None)
    if kind is None:
        raise TypeError(f"numpy has no dtype {name}")
    return np.dtype(kind)


def as_array(values: Any) -> np.ndarray:
    """``values`` (numpy array or torch tensor) as a numpy array of the same dtype and shape."""
    import numpy as np

    if not hasattr(values, "detach"):
        return np.asarray(values)
    import torch

    from fcconv.dtypes import name_of

    tensor = values.detach().cpu()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    tensor = tensor.contiguous()
    name = name_of(tensor.dtype)
    if name in _NATIVE:
        return tensor.numpy()
    width = tensor.element_size()
    bits = tensor.reshape(-1).view(torch.uint8).numpy()
    return bits.view(f"u{width}").view(numpy_dtype(name)).reshape(tuple(tensor.shape))
