"""The implementations fastattn is compared with.

* ``numpy``: the oracle, :mod:`fastattn.reference` (float64 NumPy); always
  there.
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` for the
  attention cases and ``torch.nn.MultiheadAttention`` (``batch_first=True``,
  eval, ``torch.inference_mode()``, ``need_weights=False``) for the layer
  (for its decode step, which it has no cache for, over the whole history).
* ``onnxruntime``: the ``com.microsoft`` ``MultiHeadAttention`` contrib op
  as a one-node ONNX model on the CPU execution provider, for the
  attention cases (the op takes projected ``(B, S, H*D)`` inputs, so it is
  the peer of the attention core, not of the layer).

Each peer turns a :class:`~fastattn.bench.cases.Problem` into a pair
``(run, convert)``: ``run()`` is what is timed, ``convert(run())`` gives
the result in the oracle's layout and dtype for the check. A peer that
has no counterpart for a case raises :class:`NotApplicable`. Inputs are put
into each peer's preferred layout before timing, so only the call is timed.
"""

import importlib
import importlib.util

import numpy as np


class NotApplicable(Exception):
    """The peer has no counterpart of this case (or dtype)."""


class Peer:
    name = ""
    modules = ()
    install = ""
    description = ""

    def probe(self):
        """``(available, version, reason)``."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            return False, None, f"not installed ({', '.join(missing)}): {self.install}"
        try:
            return True, self.version(), None
        except Exception as exc:  # a broken install is reported, not fatal
            return False, None, f"failed to import: {type(exc).__name__}: {exc}"

    def version(self):
        return importlib.import_module(self.modules[0]).__version__

    def start(self, threads):
        """Called once before the suite, with the run's thread count."""

    def stop(self):
        """Called once after the suite."""

    def prepare(self, problem):
        raise NotImplementedError


def identity(x):
    """The ``convert`` of an implementation whose output is already an ndarray
    in the oracle's layout."""
    return x


class NumpyPeer(Peer):
    name = "numpy"
    modules = ("numpy",)
    install = "pip install numpy"
    description = "the NumPy oracle, fastattn.reference (float64)"

    def prepare(self, problem):
        return problem.oracle_fn(), identity


class TorchPeer(Peer):
    name = "torch"
    modules = ("torch",)
    install = "pip install torch  (the CPU build is enough)"
    description = ("torch.nn.functional.scaled_dot_product_attention; "
                   "torch.nn.MultiheadAttention for the layer")

    def start(self, threads):
        import torch

        self._torch = torch
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)

    def stop(self):
        self._torch.set_num_threads(self._saved_threads)

    def prepare(self, problem):
        torch = self._torch
        if problem.kind == "attention":
            F = torch.nn.functional
            q, k, v = (torch_tensor(a) for a in (problem.q, problem.k, problem.v))
            mask = None
            if problem.key_lengths is not None:
                lengths = torch.from_numpy(problem.key_lengths)
                keys = torch.arange(problem.k.shape[2])
                mask = (keys[None, :] < lengths[:, None])[:, None, None, :]  # True = attend
            causal = problem.is_causal

            def run():
                with torch.inference_mode():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            return run, numpy_array
        if problem.kind == "decode_cache":
            return self._decode(problem)
        if problem.kind == "mha":
            module = torch_mha_module(problem.weights, problem.num_heads, problem.dtype)
            x = torch_tensor(problem.x)
            pad = None
            if problem.key_lengths is not None:
                lengths = torch.from_numpy(problem.key_lengths)
                pad = torch.arange(x.shape[1])[None, :] >= lengths[:, None]  # True = padding

            def run():
                with torch.inference_mode():
                    return module(x, x, x, key_padding_mask=pad, need_weights=False)[0]
            return run, numpy_array
        if problem.kind == "mha_decode":
            # torch's layer has no cache: the new token's query attends over
            # the whole history, whose keys and values it projects again.
            module = torch_mha_module(problem.weights, problem.num_heads, problem.dtype)
            history = torch_tensor(problem.history)
            x_new = torch_tensor(np.ascontiguousarray(problem.x_new))

            def run():
                with torch.inference_mode():
                    return module(x_new, history, history, need_weights=False)[0]
            return run, numpy_array
        raise NotApplicable(f"torch has no counterpart in this suite for {problem.kind}")

    def _decode(self, problem):
        """Decode over the cache in the row's storage: the full-precision
        cache as it is, the bfloat16 one with q, K and V all in bfloat16 (how
        torch runs a bfloat16 model). torch's SDPA has no float16 CPU path
        worth timing and no int8 K/V."""
        torch = self._torch
        F = torch.nn.functional
        kv = problem.kv_dtype
        if kv == problem.dtype.name:
            q, k, v = (torch.from_numpy(a) for a in (problem.q, problem.k, problem.v))
        elif kv == "bfloat16":
            k, v = (torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
                    for a in (problem.k, problem.v))
            q = torch.from_numpy(problem.q).to(torch.bfloat16)
        else:
            raise NotApplicable(f"torch SDPA is timed on float32 and bfloat16 caches, not {kv}")
        gqa = problem.num_kv_heads != problem.q.shape[1]

        def run():
            with torch.inference_mode():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        return run, lambda t: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def torch_tensor(a):
    """A NumPy array as a torch tensor sharing its memory; bfloat16
    (``ml_dtypes.bfloat16``, which torch cannot import) crosses as its
    16-bit pattern."""
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def numpy_array(t):
    """A torch CPU tensor as a NumPy array (bfloat16 as ``ml_dtypes.bfloat16``)."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_dtype(dtype):
    """The torch dtype of a NumPy ``dtype`` (bfloat16 by name)."""
    import torch

    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return torch.bfloat16
    return {"float64": torch.float64, "float16": torch.float16}.get(dtype.name, torch.float32)


def torch_mha_module(weights, num_heads, dtype):
    """A ``torch.nn.MultiheadAttention`` (batch_first, eval) of ``dtype``
    holding ``weights`` (``(in, out)`` layout, as in
    :func:`cases.make_mha_weights`)."""
    import torch

    w = weights
    embed_dim = w["w_q"].shape[0]
    module = torch.nn.MultiheadAttention(embed_dim, num_heads, bias=True, batch_first=True,
                                         dtype=torch_dtype(dtype)).eval()
    with torch.no_grad():
        module.in_proj_weight.copy_(torch_tensor(
            np.concatenate([w["w_q"].T, w["w_k"].T, w["w_v"].T])))
        module.in_proj_bias.copy_(torch_tensor(np.concatenate([w["b_q"], w["b_k"], w["b_v"]])))
        module.out_proj.weight.copy_(torch_tensor(np.ascontiguousarray(w["w_o"].T)))
        module.out_proj.bias.copy_(torch_tensor(w["b_o"]))
    return module


class OnnxruntimePeer(Peer):
    name = "onnxruntime"
    modules = ("onnxruntime", "onnx")
    install = "pip install onnxruntime onnx"
    description = "onnxruntime com.microsoft MultiHeadAttention contrib op (CPU EP), one-node model"

    def start(self, threads):
        self._threads = threads

    def prepare(self, problem):
        if problem.kind == "decode_cache" and (problem.kv_dtype != problem.dtype.name
                                               or problem.num_kv_heads != problem.q.shape[1]):
            raise NotApplicable("the MultiHeadAttention contrib op takes full-precision K/V "
                                "with as many heads as q")
        if problem.kind not in ("attention", "decode_cache"):
            raise NotApplicable(f"the MultiHeadAttention contrib op is the attention core only, "
                                f"not a counterpart of {problem.kind}")
        if problem.dtype != np.float32:
            raise NotApplicable("onnxruntime's CPU MultiHeadAttention supports float32 only")
        B, H, Lq, D = problem.q.shape
        Lk, Dv = problem.v.shape[2], problem.v.shape[3]
        causal = problem.is_causal
        if causal and Lq != Lk:
            raise NotApplicable("the contrib op's causal mask needs Lq == Lk here")
        session = ort_mha_session(B, H, Lq, Lk, D, Dv, causal=causal,
                                  with_lengths=problem.key_lengths is not None,
                                  threads=self._threads)
        import onnxruntime as ort

        def bsd(a):  # (B, H, L, D) -> (B, L, H*D), the op's layout
            return np.ascontiguousarray(a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1))

        binding = session.io_binding()
        feeds = {"query": bsd(problem.q), "key": bsd(problem.k), "value": bsd(problem.v)}
        if problem.key_lengths is not None:
            feeds["key_padding_mask"] = problem.key_lengths.astype(np.int32)
        keep = []
        for name, arr in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            keep.append(value)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("output", "cpu")

        def run():
            session.run_with_iobinding(binding)
            return binding

        def convert(b):
            out = b.copy_outputs_to_cpu()[0]  # (B, Lq, H*Dv)
            return out.reshape(B, Lq, H, Dv).transpose(0, 2, 1, 3)

        run.keep = keep  # the bound inputs must outlive the binding
        return run, convert


def ort_mha_session(B, H, Lq, Lk, D, Dv, *, causal, with_lengths, threads):
    """An InferenceSession of one ``com.microsoft.MultiHeadAttention`` node:
    query ``(B, Lq, H*D)``, key ``(B, Lk, H*D)``, value ``(B, Lk, H*Dv)``,
    optional ``key_padding_mask`` of ``B`` key lengths, output ``(B, Lq, H*Dv)``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = ["query", "key", "value"] + (["", "key_padding_mask"] if with_lengths else [])
    node = helper.make_node("MultiHeadAttention", inputs, ["output"], domain="com.microsoft",
                            num_heads=H, unidirectional=int(causal))
    f32 = TensorProto.FLOAT
    graph_inputs = [helper.make_tensor_value_info("query", f32, [B, Lq, H * D]),
                    helper.make_tensor_value_info("key", f32, [B, Lk, H * D]),
                    helper.make_tensor_value_info("value", f32, [B, Lk, H * Dv])]
    if with_lengths:
        graph_inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32, [B]))
    graph = helper.make_graph([node], "fastattn_bench_mha", graph_inputs,
                              [helper.make_tensor_value_info("output", f32, [B, Lq, H * Dv])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # understood by every onnxruntime that has this op on the CPU
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


PEERS = {p.name: p for p in (NumpyPeer(), TorchPeer(), OnnxruntimePeer())}
PEER_ALIASES = {"np": "numpy", "oracle": "numpy", "ort": "onnxruntime", "pytorch": "torch"}

