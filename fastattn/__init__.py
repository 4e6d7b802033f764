"""fastattn: fast CPU Transformer attention with a NumPy API.

C kernels (OpenMP, runtime-dispatched SIMD) behind a thin Cython layer;
every function is checked against the NumPy oracle in
:mod:`fastattn.reference`.
"""

__version__ = "0.1.0"

# Without the compiled extension every submodule fails with Python's
# misleading "partially initialized module (most likely due to a circular
# import)"; say what is missing and how to build it, as NumPy does when it
# is imported from its source directory.
try:
    from fastattn import _kernels as _extension
except ImportError as _exc:
    import importlib.util as _util

    _built = _util.find_spec("fastattn._kernels") is not None
    raise ImportError(
        ("fastattn's compiled extension fastattn._kernels failed to load"
         f" ({_exc}). Rebuild it" if _built else
         "fastattn's compiled extension fastattn._kernels is not built: you are"
         " probably importing fastattn from its source tree. Build it")
        + " in place with\n    python setup.py build_ext --inplace\nor install"
        " fastattn with\n    python -m pip install -e .\nand then retry (or run"
        " Python from outside the source tree against an installed fastattn)."
    ) from None
del _extension


from fastattn._config import (
    available_isas,
    get_isa,
    get_num_threads,
    set_isa,
    set_num_threads,
    show_config,
)
from fastattn._config import _apply_isa_env
from fastattn import reference
from fastattn.attention import scaled_dot_product_attention
from fastattn.heads import merge_heads, split_heads
from fastattn.masks import apply_sequence_mask, masked_softmax, sequence_mask
from fastattn.kv_cache import KVCache
from fastattn.kv_quant import dequantize_kv, quantize_kv
from fastattn.layer import MultiHeadAttention
from fastattn.position import add_position_encoding, sinusoidal_position_encoding
from fastattn.rotary import alibi_slopes, apply_rotary
from fastattn.paged import PagedKVCache, paged_attention
from fastattn.varlen import varlen_attention

_apply_isa_env()
del _apply_isa_env

# Optional parts are imported on first use, so that `import fastattn` never
# imports CuPy or matplotlib.
_LAZY_SUBMODULES = ("cuda", "plotting")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"fastattn.{name}")
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")

__all__ = [
    "__version__",
    "KVCache",
    "MultiHeadAttention",
    "PagedKVCache",
    "add_position_encoding",
    "alibi_slopes",
    "apply_rotary",
    "apply_sequence_mask",
    "available_isas",
    "dequantize_kv",
    "get_isa",
    "get_num_threads",
    "masked_softmax",
    "merge_heads",
    "quantize_kv",
    "paged_attention",
    "reference",
    "scaled_dot_product_attention",
    "sequence_mask",
    "set_isa",
    "set_num_threads",
    "show_config",
    "varlen_attention",
    "sinusoidal_position_encoding",
    "split_heads",
]
