"""Unpickling that builds plain containers and numpy arrays only (the CIFAR-10 batches)."""

import codecs
import pickle
from typing import Any

import numpy as np

_RECONSTRUCT = np.empty(0).__reduce__()[0]


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (the CIFAR-10 batches), never
    arbitrary objects."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}") from None
