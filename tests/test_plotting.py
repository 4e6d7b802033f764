"""fastattn.plotting: argument checks (always) and rendering to PNG with the
Agg backend (when matplotlib is installed)."""

import io
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def plt():
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


def render(ax):
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png", dpi=40)
    data = buf.getvalue()
    assert data.startswith(PNG_MAGIC) and len(data) > 500
    return data


def weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    return x / x.sum(-1, keepdims=True)


def test_importing_plotting_does_not_import_matplotlib():
    code = ("import sys, fastattn.plotting, fastattn.bench; "
            "print(sorted(m for m in ('matplotlib', 'rich', 'torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_matplotlib_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plotting.attention_heatmap(weights((2, 2)), ["a", "b"], ["a", "b"])
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plotting.position_encoding_heatmap(np.zeros((2, 4)))


@pytest.mark.parametrize("shape, q, k, match", [
    ((3, 4), ["a"] * 3, ["b"] * 3, "4 key tokens"),
    ((3, 4), ["a"] * 2, ["b"] * 4, "3 query tokens"),
    ((2, 2, 3, 4), ["a"] * 3, ["b"] * 4, "batch size 1"),
    ((5,), ["a"], ["b"] * 5, r"\(Lq, Lk\)"),
])
def test_attention_heatmap_checks_shapes(shape, q, k, match):
    with pytest.raises(ValueError, match=match):
        plotting.attention_heatmap(np.ones(shape), q, k)


def test_attention_heatmap_checks_head():
    w = weights((2, 3, 3))
    with pytest.raises(ValueError, match="out of range for 2 heads"):
        plotting.attention_heatmap(w, "abc", "abc", head=2)
    with pytest.raises(TypeError, match="head must be an integer"):
        plotting.attention_heatmap(w, "abc", "abc", head=1.0)


def test_position_encoding_heatmap_checks_ndim():
    with pytest.raises(ValueError, match="2-D"):
        plotting.position_encoding_heatmap(np.zeros(8))


def test_attention_heatmap_one_head_and_mean(plt):
    tokens = ["The", "animal", "was", "tired"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 4, 8))
    _, w = fastattn.scaled_dot_product_attention(x, x, x, return_weights=True)  # (1, 3, 4, 4)

    ax = plotting.attention_heatmap(w, tokens, tokens, head=2)
    assert ax.get_title() == "head 2"
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    np.testing.assert_allclose(ax.images[0].get_array(), w[0, 2])
    render(ax)

    fig, axes = plt.subplots(1, 2)
    ax = plotting.attention_heatmap(w[0], tokens, tokens, ax=axes[0])
    assert ax is axes[0]
    assert ax.get_title() == "mean over heads"
    np.testing.assert_allclose(ax.images[0].get_array(), w[0].mean(axis=0))
    ax = plotting.attention_heatmap(w[0, 1, :1], ["The"], tokens, ax=axes[1], head=-1)
    assert ax.get_title() == "head 0"
    render(ax)


def test_position_encoding_heatmap_renders(plt):
    table = fastattn.sinusoidal_position_encoding(20, 512)
    ax = plotting.position_encoding_heatmap(table)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("channel", "position")
    image = ax.images[0]
    assert image.get_array().shape == (20, 512)
    assert image.get_clim() == (-1.0, 1.0)
    render(ax)


def test_speedup_chart_renders(plt):
    timing = {"median": 1.0}
    results = {
        "threads": 2, "dtype": "float32", "machine": {"cpu": "test CPU"},
        "peers": {"numpy": {"available": True}, "torch": {"available": True},
                  "onnxruntime": {"available": False}},
        "rows": [
            {"label": "sdpa", "shape": "1x2x3x4", "status": "ok",
             "impls": {"fastattn": {"timing": timing}, "numpy": {"speedup": 20.0},
                       "torch": {"speedup": 1.5}}},
            {"label": "mha", "shape": "1x2x3x4", "status": "n/a", "impls": {}},
            {"label": "softmax", "shape": "1x2x3x4", "status": "ok",
             "impls": {"numpy": {"speedup": 8.0}, "torch": {"status": "n/a"}}},
        ],
    }
    ax = plotting.speedup_chart(results)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sdpa 1x2x3x4", "softmax 1x2x3x4"]
    assert ax.get_xscale() == "log"
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == [1.5, 8.0, 20.0]
    render(ax)


def _decode_results():
    """Decode rows at two head layouts: the one with more cache lengths is drawn."""
    rows = []
    for Hkv, lengths in ((32, (256, 1024, 4096)), (8, (8192,))):
        for S in lengths:
            for kv, scale in (("float32", 1.0), ("bfloat16", 0.5), ("int8", 0.3)):
                impls = {"fastattn": {"timing": {"median": scale * S * 1e-6}}}
                if kv != "int8":
                    impls["torch"] = {"timing": {"median": 2 * S * 1e-6}}
                rows.append({"params": {"kv_dtype": kv, "B": 1, "H": 32, "Hkv": Hkv, "S": S,
                                        "D": 128}, "impls": impls})
    rows.append({"params": {"kv_dtype": "int8", "greedy": True}, "impls": {}})
    return {"rows": rows, "threads": 2}


def test_decode_chart_draws_time_against_length_per_kv_dtype(plt):
    ax = plotting.decode_chart(_decode_results())
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"fastattn float32", "fastattn bfloat16", "fastattn int8",
                          "torch float32", "torch bfloat16"}
    np.testing.assert_array_equal(lines["fastattn int8"].get_xdata(), [256, 1024, 4096])
    np.testing.assert_allclose(lines["fastattn int8"].get_ydata(), [0.3 * 0.256, 0.3 * 1.024,
                                                                     0.3 * 4.096])
    assert lines["torch float32"].get_linestyle() == "--"
    assert "Hkv=32" in ax.get_title() and "2 threads" in ax.get_title()
    render(ax)


def test_decode_chart_needs_decode_rows():
    with pytest.raises(ValueError, match="no timed decode rows"):
        plotting.decode_chart({"rows": [{"params": {}, "impls": {}}]})
