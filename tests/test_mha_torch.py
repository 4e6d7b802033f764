"""MultiHeadAttention against torch.nn.MultiheadAttention (batch_first=True,
eval, inference mode), with weights converted by from_torch: relative error
at most 1e-5 in float32. torch is a test/bench extra
(pip install torch==2.13.0, the CPU build); without it these tests skip."""

import numpy as np
import pytest

import fastattn

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0, CPU build)")

RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


def _module(E, H, *, bias=True, kdim=None, vdim=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=dtype)
    if bias:  # torch initialises biases to 0: make them count
        with torch.no_grad():
            m.in_proj_bias.normal_(0, 0.1)
            m.out_proj.bias.normal_(0, 0.1)
    return m.eval()


def _torch_call(m, q, k, v, **kw):
    with torch.inference_mode():
        out, w = m(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), **kw)
    return out.numpy(), None if w is None else w.numpy()


def _inputs(rng, B, Lq, Lk, E, kdim, vdim, dtype, self_attn):
    q = rng.standard_normal((B, Lq, E)).astype(dtype)
    if self_attn:
        return q, q, q
    k = rng.standard_normal((B, Lk, kdim or E)).astype(dtype)
    v = rng.standard_normal((B, Lk, vdim or E)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dims", [(None, None), (20, 12)], ids=["same_dims", "kdim_vdim"])
@pytest.mark.parametrize("masks", ["none", "key_padding", "bool_mask", "float_mask", "causal", "all"])
def test_matches_torch(rng, bias, dims, masks):
    B, Lq, Lk, E, H = 3, 9, 9, 32, 4
    kdim, vdim = dims
    self_attn = kdim is None
    tm = _module(E, H, bias=bias, kdim=kdim, vdim=vdim)
    fm = fastattn.MultiHeadAttention.from_torch(tm)
    assert (fm.embed_dim, fm.num_heads, fm.kdim, fm.vdim) == (E, H, kdim or E, vdim or E)
    q, k, v = _inputs(rng, B, Lq, Lk, E, kdim, vdim, np.float32, self_attn)
    tkw, fkw = {}, {}
    if masks in ("key_padding", "all"):
        lengths = np.array([9, 5, 1])
        tkw["key_padding_mask"] = torch.from_numpy(np.arange(Lk)[None, :] >= lengths[:, None])  # True = pad
        fkw["key_lengths"] = lengths
    if masks in ("bool_mask", "all"):
        allowed = rng.random((Lq, Lk)) > 0.3
        allowed[:, 0] = True  # no fully masked row: torch gives NaN there
        tkw["attn_mask"] = torch.from_numpy(~allowed)  # torch: True = masked out
        fkw["attn_mask"] = allowed
    if masks == "float_mask":
        add = rng.standard_normal((B * H, Lq, Lk)).astype(np.float32)  # torch's 3-D form
        tkw["attn_mask"] = torch.from_numpy(add)
        fkw["attn_mask"] = add.reshape(B, H, Lq, Lk)
    if masks in ("causal", "all"):
        causal = np.triu(np.ones((Lq, Lk), bool), 1)
        if "attn_mask" in tkw:
            tkw["attn_mask"] = tkw["attn_mask"] | torch.from_numpy(causal)
        else:
            tkw["attn_mask"] = torch.from_numpy(causal)
            tkw["is_causal"] = True  # torch's hint; the mask is what it applies
        fkw["is_causal"] = True
    want, want_w = _torch_call(tm, q, k, v, need_weights=True, average_attn_weights=False, **tkw)
    args = () if self_attn else (k, v)
    got, got_w = fm(q, *args, return_weights=True, **fkw)
    assert _rel_err(got, want) <= 1e-5
    assert _rel_err(got_w, want_w) <= 1e-5
    # and torch's fast path (need_weights=False) agrees too
    want_fast, _ = _torch_call(tm, q, k, v, need_weights=False, **tkw)
    assert _rel_err(got, want_fast) <= 1e-5


def test_matches_torch_float64(rng):
    tm = _module(24, 3, dtype=torch.float64, seed=2)
    fm = fastattn.MultiHeadAttention.from_torch(tm)
    assert fm.dtype == np.float64
    q = rng.standard_normal((2, 7, 24))
    lengths = np.array([7, 3])
    kpm = torch.from_numpy(np.arange(7)[None, :] >= lengths[:, None])
    want, _ = _torch_call(tm, q, q, q, key_padding_mask=kpm, need_weights=False)
    assert _rel_err(fm(q, key_lengths=lengths), want) <= RTOL[np.float64]


def test_fully_masked_rows_are_zero_where_torch_gives_nan(rng):
    tm = _module(16, 2)
    fm = fastattn.MultiHeadAttention.from_torch(tm)
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    lengths = np.array([4, 0])  # the second sequence has no key at all
    kpm = torch.from_numpy(np.arange(4)[None, :] >= lengths[:, None])
    want, want_w = _torch_call(tm, q, q, q, key_padding_mask=kpm, need_weights=True,
                               average_attn_weights=False)
    got, w = fm(q, key_lengths=lengths, return_weights=True)
    # torch gives NaN weights for a row with no key, a known upstream behaviour
    assert np.isnan(want_w[1]).all()
    assert (w[1] == 0).all() and not np.isnan(got).any()
    # the attention output is 0 there, so the layer returns the output bias
    np.testing.assert_allclose(got[1], np.broadcast_to(tm.out_proj.bias.detach().numpy(), (4, 16)), rtol=1e-6)
    assert _rel_err(got[0], want[0]) <= 1e-5


def test_decode_with_cache_matches_torch_over_the_concatenated_sequence(rng):
    tm = _module(48, 6, seed=4)
    fm = fastattn.MultiHeadAttention.from_torch(tm)
    x = rng.standard_normal((2, 10, 48)).astype(np.float32)
    cache = fm.new_cache(2, 10)
    fm(x[:, :7], cache=cache)
    for t in range(7, 10):
        got = fm(x[:, t:t + 1], cache=cache)
        seen = x[:, :t + 1]
        want, _ = _torch_call(tm, x[:, t:t + 1], seen, seen, need_weights=False)
        assert _rel_err(got, want) <= 1e-5


def test_from_torch_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="add_bias_kv"):
        fastattn.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        fastattn.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(TypeError, match="^module must be a torch.nn.MultiheadAttention, got Linear"):
        fastattn.MultiHeadAttention.from_torch(torch.nn.Linear(2, 2))


def test_constructor_init_statistics_match_torch():
    # same distributions (not the same draws): compare the bounds
    E, H = 96, 4
    tm = torch.nn.MultiheadAttention(E, H)
    d = fastattn.MultiHeadAttention(E, H, seed=0).state_dict()
    t_in = tm.in_proj_weight.detach().numpy()
    f_in = np.concatenate([d["w_q"], d["w_k"], d["w_v"]], axis=1)
    assert abs(np.abs(f_in).max() - np.abs(t_in).max()) < 0.02 * np.abs(t_in).max()
    assert abs(f_in.std() - t_in.std()) < 0.05 * t_in.std()
    t_out = tm.out_proj.weight.detach().numpy()
    assert abs(d["w_o"].std() - t_out.std()) < 0.05 * t_out.std()
    assert (tm.in_proj_bias.detach().numpy() == 0).all() and (d["b_q"] == 0).all()
