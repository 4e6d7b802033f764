"""Pictures of attention weights, position encodings and benchmark results.

matplotlib is optional (``pip install 'fastattn[bench]'`` or
``pip install matplotlib``) and is imported only when a function here is
called. Every function draws into ``ax`` when one is given, and otherwise
into a new figure from :func:`matplotlib.pyplot.subplots`; it returns the
Axes.
"""

import numpy as np

__all__ = ["attention_heatmap", "decode_chart", "position_encoding_heatmap", "speedup_chart"]


def _new_axes(ax, figsize):
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "fastattn.plotting needs matplotlib: pip install matplotlib "
            "(or pip install 'fastattn[bench]')") from None
    _, ax = plt.subplots(figsize=figsize)
    return ax


def _colorbar(ax, image):
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def attention_heatmap(weights, query_tokens, key_tokens, *, head=None, ax=None):
    """Draw attention weights as a (query × key) heatmap with token labels.

    Parameters
    ----------
    weights : array_like
        ``(Lq, Lk)`` for one head, ``(H, Lq, Lk)`` for several, or
        ``(1, H, Lq, Lk)`` as returned by
        ``scaled_dot_product_attention(..., return_weights=True)`` for a
        batch of one.
    query_tokens : sequence of str, length ``Lq``
        Row labels.
    key_tokens : sequence of str, length ``Lk``
        Column labels.
    head : int, optional
        The head to draw; by default the average over the heads.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when omitted.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> from fastattn.plotting import attention_heatmap
    >>> tokens = ["the", "cat", "sat"]
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    >>> _, w = fastattn.scaled_dot_product_attention(x, x, x, is_causal=True, return_weights=True)
    >>> ax = attention_heatmap(w, tokens, tokens, head=1)  # doctest: +SKIP
    >>> ax.get_title()  # doctest: +SKIP
    'head 1'
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 4:
        if w.shape[0] != 1:
            raise ValueError(f"weights with a batch axis must have batch size 1, got shape {w.shape}")
        w = w[0]
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weights must be (Lq, Lk), (H, Lq, Lk) or (1, H, Lq, Lk), got shape {np.shape(weights)}")
    H, Lq, Lk = w.shape
    query_tokens, key_tokens = list(query_tokens), list(key_tokens)
    if len(query_tokens) != Lq or len(key_tokens) != Lk:
        raise ValueError(
            f"weights of shape {np.shape(weights)} need {Lq} query tokens and {Lk} key tokens, "
            f"got {len(query_tokens)} and {len(key_tokens)}")
    if head is None:
        data = w.mean(axis=0)
        title = "mean over heads" if H > 1 else "attention weights"
    else:
        if isinstance(head, (bool, np.bool_)) or not isinstance(head, (int, np.integer)):
            raise TypeError(f"head must be an integer or None, got {head!r}")
        if not -H <= head < H:
            raise ValueError(f"head {head} is out of range for {H} heads")
        data = w[head]
        title = f"head {head % H}"
    ax = _new_axes(ax, (0.45 * Lk + 2.0, 0.45 * Lq + 1.2))
    image = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=max(float(data.max()), 1e-12),
                      aspect="auto", interpolation="nearest")
    ax.set_xticks(range(Lk), key_tokens, rotation=90)
    ax.set_yticks(range(Lq), query_tokens)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    _colorbar(ax, image)
    return ax


def position_encoding_heatmap(table, *, ax=None):
    """Draw a ``(positions × channels)`` position-encoding table.

    Rows are positions and columns channels, coloured from -1 to 1: in the
    ``"concat"`` layout the sine half and the cosine half sit side by side,
    in the ``"interleaved"`` layout they alternate column by column.

    Parameters
    ----------
    table : array_like, shape ``(length, channels)``
        For example ``fastattn.sinusoidal_position_encoding(20, 512)``.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import fastattn
    >>> from fastattn.plotting import position_encoding_heatmap
    >>> table = fastattn.sinusoidal_position_encoding(20, 512)
    >>> ax = position_encoding_heatmap(table)  # doctest: +SKIP
    >>> ax.get_xlabel()  # doctest: +SKIP
    'channel'
    """
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"table must be 2-D (length, channels), got shape {t.shape}")
    L, C = t.shape
    ax = _new_axes(ax, (min(12.0, 2.0 + C / 40), min(8.0, 1.5 + L / 8)))
    image = ax.imshow(t, cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    ax.set_xlabel("channel")
    ax.set_ylabel("position")
    _colorbar(ax, image)
    return ax


def speedup_chart(results, *, ax=None):
    """Bar chart of fastattn's speed-up against each peer, per benchmark row.

    Parameters
    ----------
    results : dict
        What ``python -m fastattn.bench --out DIR`` writes to
        ``DIR/results.json`` (or :func:`fastattn.bench.run_suite` returns).
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        Horizontal bars on a log axis; a bar right of the line at 1 means
        fastattn is faster than that peer.
    """
    rows = [r for r in results["rows"] if r["status"] != "n/a"]
    peers = [p for p, st in results["peers"].items() if st["available"]]
    ax = _new_axes(ax, (8.0, 0.9 + 0.38 * max(1, len(rows))))
    height = 0.8 / max(1, len(peers))
    colors = {"numpy": "#8c8c8c", "torch": "#ee4c2c", "onnxruntime": "#4a7fc1"}
    labels = [f"{r['label']} {r['shape']}" for r in rows]
    values = []
    for j, peer in enumerate(peers):
        ys, xs = [], []
        for i, r in enumerate(rows):
            s = r["impls"].get(peer, {}).get("speedup")
            if s:
                ys.append(i + (j - (len(peers) - 1) / 2) * height)
                xs.append(s)
        values += xs
        ax.barh(ys, xs, height=height, label=f"vs {peer}", color=colors.get(peer))
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of fastattn (peer time / fastattn time, log scale)")
    if values:
        ax.set_xlim(min(0.5, min(values) / 1.5), max(values) * 1.5)
    machine = results.get("machine", {}).get("cpu", "")
    threads = results.get("threads")
    ax.set_title(f"fastattn vs peers, {threads} thread{'' if threads == 1 else 's'}, "
                 f"{results.get('dtype')}"
                 + (f"\n{machine}" if machine else ""), fontsize=10)
    if peers:
        ax.legend(loc="lower right", fontsize=8)
    return ax


def decode_chart(results, *, ax=None):
    """Decode time against the cache length, one line per ``kv_dtype``,
    with torch's SDPA on the same storages dashed.

    Parameters
    ----------
    results : dict
        A run of the ``decode_lengths`` (or ``decode``) case of
        ``python -m fastattn.bench``, as :func:`fastattn.bench.run_suite`
        returns it or ``--out`` writes it to ``results.json``. The rows of
        the head layout (``B``, ``H``, ``Hkv``, ``D``) with the most cache
        lengths are drawn.
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.axes.Axes
        Log-log axes: cache length (keys) and median time per call (ms).
    """
    rows = [r for r in results["rows"]
            if r.get("params", {}).get("kv_dtype") and not r["params"].get("greedy")
            and (r["impls"].get("fastattn") or {}).get("timing")]
    if not rows:
        raise ValueError("results hold no timed decode rows: run the decode_lengths or "
                         "decode case (python -m fastattn.bench --cases decode_lengths)")
    groups = {}
    for r in rows:
        p = r["params"]
        groups.setdefault((p["B"], p["H"], p["Hkv"], p["D"]), []).append(r)
    (B, H, Hkv, D), rows = max(groups.items(), key=lambda kv: len({r["params"]["S"] for r in kv[1]}))
    series = {}
    for r in rows:
        kv, S = r["params"]["kv_dtype"], r["params"]["S"]
        for impl in ("fastattn", "torch"):
            timing = (r["impls"].get(impl) or {}).get("timing")
            if timing:
                series.setdefault(f"{impl} {kv}", {})[S] = 1e3 * timing["median"]
    ax = _new_axes(ax, (6.4, 4.2))
    colors = {"float32": "#1f77b4", "float64": "#1f77b4", "bfloat16": "#2ca02c",
              "float16": "#9467bd", "int8": "#d62728"}
    for name, points in series.items():
        impl, kv = name.split(" ", 1)
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o" if impl == "fastattn" else "s",
                linestyle="-" if impl == "fastattn" else "--", color=colors.get(kv), label=name,
                alpha=1.0 if impl == "fastattn" else 0.7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cache length (keys)")
    ax.set_ylabel("decode time per call (ms, median)")
    threads = results.get("threads")
    ax.set_title(f"decode: B={B}, H={H}, Hkv={Hkv}, D={D}, 1 query, {threads} "
                 f"thread{'' if threads == 1 else 's'}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax
