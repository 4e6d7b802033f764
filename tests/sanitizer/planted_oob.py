"""A planted out-of-bounds write, to show the sanitizer build catches one.

Calls the C kernel fa_merge_heads directly (through ctypes, bypassing the
Python checks) with an output buffer one element too short. Under the
FASTATTN_SANITIZE=address,undefined build, AddressSanitizer must stop the
process with a heap-buffer-overflow WRITE inside the kernel; tests/sanitizer/
run.sh fails if it does not. Never run it against a normal build: there it
silently corrupts the heap.
"""
import ctypes
import sys

import numpy as np

import fastattn

flags = fastattn.show_config(print_output=False)["flags"]
if "-fsanitize=address" not in flags:
    sys.exit("planted_oob.py: fastattn is not the sanitizer build; refusing to corrupt memory")


class View4(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64 * 4)]


lib = ctypes.CDLL(fastattn._kernels.__file__)
lib.fa_merge_heads.argtypes = [ctypes.c_int, View4, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int]

B, H, S, D = 1, 2, 3, 4
x = np.ones((B, H, S, D), np.float32)
y = np.empty(B * S * H * D - 1, np.float32)          # one element short
view = View4(x.ctypes.data, (ctypes.c_int64 * 4)(*(s // 4 for s in x.strides)))
print("planted_oob: writing", B * S * H * D, "floats into", y.size, flush=True)
lib.fa_merge_heads(4, view, y.ctypes.data, B, H, S, D, 1)
print("planted_oob: NOT CAUGHT", flush=True)
