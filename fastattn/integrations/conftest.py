"""pytest collects every module of fastattn for doctests; the integration
modules import their framework, so they are left out where it is missing."""

import importlib.util

_NEEDS = {
    "transformers.py": ("torch", "transformers"),
    "_hf_masks.py": ("torch", "transformers"),
    "_hf_encoder.py": ("torch", "transformers"),
    "_torch_bridge.py": ("torch",),
}

collect_ignore = [name for name, modules in _NEEDS.items()
                  if not all(importlib.util.find_spec(m) for m in modules)]
