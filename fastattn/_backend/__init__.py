"""Which backend runs a call: the one its arrays live on.

Every public function takes its arrays from any library; the library of its
main arrays picks the backend, as scikit-learn's and SciPy's array-API
support does. NumPy arrays, Python sequences and other host arrays run the
C kernels (``"cpu"``, :mod:`fastattn._backend.cpu`); CuPy arrays and other
CUDA arrays (``__cuda_array_interface__`` or a CUDA ``__dlpack__``) run the
CUDA kernels (``"cuda"``, :mod:`fastattn._backend.cuda`, imported only then).
Arrays of both kinds in one call are an error that names both libraries.
Both backend modules expose one kernel table with identical signatures
(their ``KERNELS``) and the same array helpers; :func:`backend_for` returns
the module a call runs on.

NumPy arrays are recognised by type before anything else, so the common call
costs one ``type(x) is np.ndarray`` per array; array_api_compat (which names
the library) is imported only for other array types.
"""

import sys

import numpy as np

DEVICES = ("cpu", "cuda")


class CudaUnavailableError(RuntimeError):
    """The GPU path cannot run here; the message says why."""


# DLPack device types that live in CUDA device memory (kDLCUDA, kDLCUDAManaged).
_DLPACK_CUDA_DEVICES = (2, 13)
_HOST_TYPES = (list, tuple, int, float, bool, np.generic)


def is_device_array(obj):
    """True for a CUDA array: CuPy, ``__cuda_array_interface__`` or a CUDA
    ``__dlpack__``. Never imports CuPy."""
    if type(obj) is np.ndarray or isinstance(obj, _HOST_TYPES):
        return False
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(obj, cp.ndarray):
        return True
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    if isinstance(obj, np.ndarray) or not hasattr(obj, "__dlpack__"):
        return False
    device = getattr(obj, "__dlpack_device__", None)
    try:
        return device is not None and int(device()[0]) in _DLPACK_CUDA_DEVICES
    except Exception:
        return False


def library_name(obj):
    """The array library ``obj`` comes from, for messages ("numpy", "cupy",
    "torch", ...)."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return "numpy"
    if isinstance(obj, _HOST_TYPES):
        return type(obj).__name__
    try:
        import array_api_compat

        namespace = array_api_compat.array_namespace(obj)
        return namespace.__name__.removeprefix("array_api_compat.").split(".")[0]
    except (ImportError, TypeError):
        return type(obj).__module__.split(".")[0]


def device_of(*arrays, names=None):
    """``"cpu"`` or ``"cuda"``: where ``arrays`` (None entries skipped) live.
    TypeError, naming both libraries, when some are CUDA arrays and others
    host arrays."""
    device = first = None
    for i, a in enumerate(arrays):
        if a is None:
            continue
        if type(a) is np.ndarray:
            here = "cpu"
        else:
            here = "cuda" if is_device_array(a) else "cpu"
        if device is None:
            device, first = here, i
        elif here != device:
            raise TypeError(mixed_message(arrays[first], a, _name(names, first), _name(names, i)))
    return device or "cpu"


def _name(names, i):
    return f"argument {i}" if names is None else names[i]


def mixed_message(a, b, name_a, name_b):
    lib_a, lib_b = library_name(a), library_name(b)
    where_a = "a CUDA" if is_device_array(a) else "a host"
    where_b = "a CUDA" if is_device_array(b) else "a host"
    return (f"arrays from different devices: {name_a} is {where_a} {lib_a} array and {name_b} "
            f"is {where_b} {lib_b} array; move them to one device (for example with "
            f"numpy.asarray or cupy.asarray)")


def check_device(device, name="device"):
    """``device`` as one of :data:`DEVICES` (a case-insensitive string)."""
    key = device.lower() if isinstance(device, str) else None
    if key not in DEVICES:
        raise ValueError(f"{name} must be one of {list(DEVICES)}, got {device!r}")
    return key


def cuda_backend():
    """The CUDA backend module (imported on first use; it loads CuPy and the
    extension only when a call needs them)."""
    from fastattn._backend import cuda as module

    return module


_cpu_module = None


def cpu_backend():
    """The CPU backend module (imported on first use: it imports the public
    modules whose helpers it shares)."""
    global _cpu_module
    if _cpu_module is None:
        from fastattn._backend import cpu as module

        _cpu_module = module
    return _cpu_module


def kernel_dtype(backend, dtype, name):
    """The dtype ``backend`` runs an input of ``dtype`` in, for the kernels
    that keep bfloat16 and float16 (masked_softmax, split/merge_heads,
    apply_rotary): those stay 16-bit where the backend's ``HALF_DTYPES``
    says so (the CPU), and compute in float32 elsewhere."""
    from fastattn._validation import compute_dtype, storage_dtype

    return storage_dtype(dtype, name) if backend.HALF_DTYPES else compute_dtype(dtype, name)


def backend_for(arrays, names):
    """The backend module that runs a call on ``arrays`` (TypeError when they
    mix host and CUDA arrays). NumPy arrays alone cost one type check each."""
    for a in arrays:
        if type(a) is not np.ndarray:
            return cuda_backend() if device_of(*arrays, names=names) == "cuda" else cpu_backend()
    return _cpu_module or cpu_backend()
