"""The ``cpu`` backend: the C++/OpenMP kernels of ``dsl_kernels._C`` (csrc/cpu).

Importing this package imports the extension (which registers the compiled kernels as
``torch.ops.dsl_C.*``, csrc/ops.cpp) and then one file per op, each registering the Python
side of its kernel. ``dsl_C`` is the namespace of the compiled kernels only; the op layer users
and ``torch.compile`` see is ``dsl::`` (:mod:`dsl_kernels.ops`), whose fake impls cover them.
An extension that is absent raises ImportError (``auto`` then warns and uses ``reference``);
one that exists but fails to load raises :class:`~dsl_kernels.backends.BrokenBackend`.
"""
from __future__ import annotations

import importlib.util

from ..registry import BrokenBackend


def import_extension():
    """Import ``dsl_kernels._C`` or raise the reason (absent vs present but broken)."""
    try:
        from ... import _C  # noqa: F401  (importing registers torch.ops.dsl_C.*)
    except ImportError as e:
        if importlib.util.find_spec("dsl_kernels._C") is None:
            raise ImportError(
                "the C++ extension dsl_kernels._C is not built; build it with `pip install "
                "--no-build-isolation -e .` (or `python setup.py build_ext --inplace`)") from e
        raise BrokenBackend(f"the C++ extension dsl_kernels._C is built but cannot be loaded "
                            f"({e}); rebuild it against the installed torch") from e
    return _C


import_extension()

from . import fused_update, grow_scores, lookup, lookup_backward, rebuild_index  # noqa: E402,F401
from . import fused_step  # noqa: E402,F401  (plan-emitting fused step: fused_lookup/apply)
from . import fill_rows, prune_regrow, update_index  # noqa: E402,F401
