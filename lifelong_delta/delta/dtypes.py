"""safetensors dtype codes (``"BF16"``, ``"F32"``, ...): their sizes, their torch names, and the floating ones.

The streaming reader and writer describe tensors by these codes, so they never need torch; :func:`torch_dtype` and
:func:`dtype_code` convert at the edges, importing torch only when given a torch dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FLOAT_CODES", "dtype_code", "dtype_name", "itemsize", "torch_dtype", "valid_code"]

#: safetensors dtype code -> (bytes per element, torch dtype name)
_CODES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""The floating dtypes: tensors of these are deltas; the others are copied."""


def itemsize(code: str) -> int:
    """Bytes per element of safetensors dtype ``code``."""
    return _CODES[code][0]


def dtype_name(code: str) -> str:
    """The torch name of safetensors dtype ``code`` (``"BF16"`` -> ``"bfloat16"``), for messages."""
    return _CODES[code][1]


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of safetensors dtype ``code`` (imports torch)."""
    import torch

    return getattr(torch, _CODES[code][1])


def dtype_code(dtype: object) -> str:
    """The safetensors code of a torch dtype, or ``dtype`` itself if it is already a code.

    Raises:
        TypeError: a dtype safetensors cannot store.
    """
    if isinstance(dtype, str):
        if dtype in _CODES:
            return dtype
    else:
        name = str(dtype).removeprefix("torch.")
        for code, (_, torch_name) in _CODES.items():
            if torch_name == name:
                return code
    raise TypeError(f"dtype {dtype} cannot be stored in safetensors")


def valid_code(code: str) -> bool:
    """Whether ``code`` is a dtype safetensors defines."""
    return code in _CODES
