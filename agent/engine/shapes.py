"""Pure: TensorRT optimisation profiles from a model's declared input shapes (and one
adapter, ``onnx_input_shapes``, that reads them from the file).

TensorRT builds a model whose inputs have dynamic dimensions only with an optimisation
profile (min, opt, max shape per input). The agent runs one frame at a time at one input size
(the card's, or the pipeline's ``input_size``), so every profile is that one shape: batch 1,
the image input at the given size, other dynamic dimensions refused with a clear message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.common.errors import ModelError

__all__ = ["Shape", "fixed_profiles", "onnx_input_shapes"]

Shape = tuple[int | None, ...]  # None (or a negative number) = dynamic


def _dynamic(d: int | None) -> bool:
    return d is None or d < 0


def fixed_profiles(
    inputs: Mapping[str, Shape],
    size: tuple[int, int] | None,
    *,
    model: str = "",
) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """``{input: (shape, shape, shape)}`` for every input with a dynamic dimension.

    The leading (batch) dimension becomes 1; a rank-4 input's spatial dimensions take ``size``
    (``(width, height)``; NCHW when its second dimension is 1 or 3, else NHWC). Inputs whose
    dimensions are all fixed need no profile and are left out.

    Raises:
        ModelError: (``"shape"``) a dynamic dimension that is neither the batch nor a spatial
            dimension given by ``size``; or spatial dimensions dynamic and ``size`` missing.
    """
    out: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for name, shape in inputs.items():
        if not any(_dynamic(d) for d in shape):
            continue
        dims: list[int | None] = [None if _dynamic(d) else d for d in shape]
        if dims:
            dims[0] = 1 if dims[0] is None else dims[0]
        if len(dims) == 4 and size is not None:
            w, h = size
            nchw = dims[1] in (1, 3) or dims[3] not in (1, 3)
            hi, wi = (2, 3) if nchw else (1, 2)
            dims[hi] = h if dims[hi] is None else dims[hi]
            dims[wi] = w if dims[wi] is None else dims[wi]
        if any(d is None for d in dims):
            hint = " (give the pipeline's input_size WxH)" if len(dims) == 4 else ""
            raise ModelError(
                f"input {name!r} has dynamic dimensions {list(shape)} that TensorRT needs a "
                f"fixed size for{hint}",
                model=model,
                reason="shape",
            )
        fixed = [int(d) for d in dims if d is not None]
        out[name] = (fixed, list(fixed), list(fixed))
    return out


def onnx_input_shapes(path: str) -> dict[str, Shape]:
    """Adapter: the declared shapes of an ONNX model's graph inputs (not its initializers)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    out: dict[str, Shape] = {}
    for vi in graph.input:
        if vi.name in inits:
            continue
        dims: Sequence[object] = vi.type.tensor_type.shape.dim
        out[vi.name] = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None  # type: ignore[attr-defined]
            for d in dims
        )
    return out
