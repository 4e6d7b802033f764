"""Bridges from fastattn to other frameworks.

Each submodule imports its framework on first import of that submodule, so
``import fastattn`` (and ``import fastattn.integrations``) never imports
torch or transformers.

- :mod:`fastattn.integrations.transformers`: fastattn as a Hugging Face
  transformers attention backend (``register``) and a fused attention layer
  for BERT-family encoders (``optimize``). Install with
  ``pip install fastattn[transformers]``.
"""
