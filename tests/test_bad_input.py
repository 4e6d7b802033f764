"""Bad inputs: the table in docs/reliability.md, run exactly as written.

The table (between the ``bad-input-table`` markers) is the single source of
truth: each row is a call, the argument it gets wrong, the exception type
and the exact message. The setup block above it (``bad-input-setup``) is
executed first. Every row must raise that exception with that message, the
message must name the argument, and nothing may crash the interpreter. A new
public function adds rows to the doc, not code here.
"""

import os
import re

import numpy as np
import pytest

import fastattn
from fastattn import _validation
from fastattn import reference as ref

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "reliability.md")
MIN_ROWS = 40


def _cell(text):
    text = text.strip().replace("\\|", "|")
    if len(text) >= 2 and text[0] == "`" and text[-1] == "`":
        text = text[1:-1]
    return text


def load_table():
    """(setup code, rows) from docs/reliability.md; each row is
    (number, call, argument, exception name, message)."""
    with open(DOC, encoding="utf-8") as fh:
        doc = fh.read()
    setup = re.search(r"<!-- bad-input-setup -->\s*```python\n(.*?)```", doc, re.S)
    table = re.search(r"<!-- bad-input-table:start -->\n(.*?)<!-- bad-input-table:end -->", doc, re.S)
    assert setup and table, "docs/reliability.md lost its bad-input markers"
    rows = []
    for line in table.group(1).splitlines()[2:]:  # skip header and rule
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        assert len(cells) == 5, f"malformed table row: {line!r}"
        rows.append(tuple(_cell(c) for c in cells))
    return setup.group(1), rows


SETUP, ROWS = load_table()


def test_table_is_complete():
    assert len(ROWS) >= MIN_ROWS
    assert [int(r[0]) for r in ROWS] == list(range(1, len(ROWS) + 1)), "rows must be numbered 1..n"
    calls = [r[1] for r in ROWS]
    assert len(set(calls)) == len(calls), "duplicate rows"
    for name in fastattn.__all__:
        if callable(getattr(fastattn, name)) and name not in ("get_isa", "get_num_threads",
                                                              "available_isas", "show_config"):
            assert any(f"fa.{name}(" in c for c in calls), f"no bad-input row for {name}"


@pytest.mark.parametrize("number,call,argument,exc_name,message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(number, call, argument, exc_name, message):
    ns = {}
    exec(SETUP, ns)
    saved = (fastattn.get_isa(), fastattn._config._num_threads)
    try:
        with pytest.raises(Exception) as info:
            eval(call, ns)
    finally:
        fastattn.set_isa(saved[0])
        fastattn.set_num_threads(saved[1])
    got = str(info.value)
    assert type(info.value).__name__ == exc_name, f"row {number}: {type(info.value).__name__}: {got}"
    if message.endswith("…"):
        assert got.startswith(message[:-1]), f"row {number}: message {got!r}"
    else:
        assert got == message, f"row {number}: message {got!r}"
    assert argument in got, f"row {number}: the message does not name {argument!r}"


def test_huge_thread_counts_are_rejected_not_crashing():
    # num_threads=200000 used to make OpenMP start 200000 threads and crash
    # the interpreter (segfault); 2**40 raised a bare OverflowError.
    x = np.zeros((2, 3))
    for n in (10**6, 2**40):
        with pytest.raises(ValueError, match="num_threads must be <= 4096"):
            fastattn.masked_softmax(x, num_threads=n)
        with pytest.raises(ValueError, match="n must be <= 4096"):
            fastattn.set_num_threads(n)
    assert fastattn.masked_softmax(x, num_threads=4096).shape == (2, 3)


def test_ragged_inputs_name_the_argument():
    with pytest.raises(ValueError, match="^scores could not be converted"):
        fastattn.masked_softmax([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="^attn_mask could not be converted"):
        fastattn.masked_softmax(np.zeros((2, 2)), attn_mask=[[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="^lengths could not be converted"):
        fastattn.sequence_mask([[1], [1, 2]])


def test_sequence_mask_huge_maxlen():
    # maxlen=2**63 used to return an empty (1, 0) mask: np.arange(2**63,
    # dtype=int64) is silently empty
    with pytest.raises(ValueError, match=r"^maxlen must be < 2\*\*63, got 9223372036854775808"):
        fastattn.sequence_mask([1], maxlen=2**63)
    with pytest.raises(ValueError, match="^lengths of shape .* and maxlen=.* overflows"):
        fastattn.sequence_mask([1, 2], maxlen=2**62)
    with pytest.raises(MemoryError):
        fastattn.sequence_mask([1, 2], maxlen=2**50)
    with pytest.raises(TypeError, match="^dtype must be a NumPy dtype, got 'foo'"):
        fastattn.sequence_mask([1], dtype="foo")


def test_position_encoding_arguments_are_named():
    pe = fastattn.sinusoidal_position_encoding
    # start_index = 2**63 raised a bare OverflowError; 2**63 - 1 the C
    # kernel's anonymous "array sizes overflow the addressable range"
    for start in (2**63, 2**63 - 1, -(2**63) - 1):
        with pytest.raises(ValueError, match="^start_index must be in"):
            pe(2, 4, start_index=start)
        with pytest.raises(ValueError, match="^start_index must be in"):
            fastattn.add_position_encoding(np.zeros((2, 4)), start_index=start)
    assert pe(1, 4, start_index=2**63 - 2).shape == (1, 4)
    # NumPy's "array is too big" / "Maximum allowed dimension exceeded"
    for L, C in ((2**62, 4), (2**40, 2**40), (2**64, 4)):
        with pytest.raises(ValueError, match=f"^length={L} and channels={C} give a result"):
            pe(L, C)
    # AttributeError: 'list' object has no attribute 'strides'
    with pytest.raises(TypeError, match="^out must be a numpy.ndarray, got list"):
        pe(2, 4, out=[[0.0] * 4] * 2)
    with pytest.raises(TypeError, match="^dtype must be float32 or float64, got 'foo'"):
        pe(2, 4, dtype="foo")
    with pytest.raises(TypeError, match="^min_timescale must be a real number, got 'abc'"):
        pe(2, 4, min_timescale="abc")
    with pytest.raises(TypeError, match="^max_timescale must be a real number, got None"):
        fastattn.add_position_encoding(np.zeros((2, 4)), max_timescale=None)


def test_masked_softmax_causal_arguments():
    x = np.zeros((2, 3))
    # an unknown alignment was accepted silently when is_causal was False
    with pytest.raises(ValueError, match="^causal_alignment must be one of"):
        fastattn.masked_softmax(x, causal_alignment="bottom-right")
    # an array raised NumPy's "truth value of an array is ambiguous"
    with pytest.raises(TypeError, match="^is_causal must be a bool, got ndarray"):
        fastattn.masked_softmax(x, is_causal=np.array([True, False]))
    with pytest.raises(TypeError, match="^is_causal must be a bool, got str"):
        fastattn.masked_softmax(x, is_causal="yes")


# ---- the barrage: every argument of every public function, every kind of
# wrong value ------------------------------------------------------------------
# Each public function has one valid call; the barrage replaces one argument
# at a time with each bad value of that argument's kind and expects a
# ValueError or TypeError whose message names the argument, within a time
# limit (a hang fails), and the valid call still working afterwards (nothing
# half-changed). The table above pins exact messages; this pins that nothing
# leaks (OverflowError, AttributeError, NumPy's own messages) for any argument.

HUGE = 10**400          # a Python int too large for a float or a C integer
BIG = 2**63             # one past int64
UNSIZED = 10**9         # a count whose result does not fit

ARRAY = "array"          # a float array argument
OPT_ARRAY = "opt_array"  # an optional array (None is valid)
LENGTHS = "lengths"      # an integer array argument
REAL = "real"            # a real scalar
OPT_REAL = "opt_real"    # a real scalar or None
COUNT = "count"          # a non-negative int that sizes a result
INDEX = "index"          # any int (an offset)
THREADS = "threads"
CHOICE = "choice"
FLAG = "flag"
DTYPE = "dtype"
OUT = "out"
WINDOW = "window"        # None or a (left, right) pair of ints >= 0 or None
POSITIVE = "positive"    # a real scalar > 0, or None
DEVICE = "device"

BAD = {
    ARRAY: [3.0, "abc", None, object(), [[1.0], [1.0, 2.0]], np.zeros((2, 3), complex),
            np.array(["a", "b"])],
    OPT_ARRAY: ["abc", object(), [[1.0], [1.0, 2.0]], np.zeros((2, 3), complex),
                np.array(["a", "b"])],
    LENGTHS: [3.0, "abc", object(), [1.5, 2.0], [-1, 2], np.array([HUGE], dtype=object),
              [[1], [1, 2]], [True, False], np.array([2**64 - 1], np.uint64)],
    REAL: [HUGE, -HUGE, "abc", 1j, None, [1.0], np.ones(2), True],
    OPT_REAL: [HUGE, "abc", 1j, [1.0], np.ones(2), True],
    COUNT: [HUGE, BIG, UNSIZED * UNSIZED, -1, 2.5, "3", None, True, np.float64(2.0), [2]],
    INDEX: [HUGE, -HUGE, BIG, 2.5, "3", None, True, [0]],
    THREADS: [HUGE, BIG, 0, -1, 2.5, "2", True, [2]],
    CHOICE: ["bogus", 3, None, ["x"], b"neox"],
    FLAG: ["False", "no", 2.5, None, np.array([True, False]), [True]],
    DTYPE: ["foo", np.int32, 3, object, np.complex64],
    OUT: [[0.0], 3.0, np.zeros(1), np.zeros((1, 1, 1, 1, 1), np.float64)],
    WINDOW: [3, "ab", (1,), (1, 2, 3), (-1, 0), (0, -1), (1.5, 0), (HUGE, 0), (True, 0),
             ("1", 0), np.array([1, 2, 3])],
    POSITIVE: [0.0, -1.0, float("nan"), float("inf"), HUGE, "abc", 1j, [1.0], np.ones(2), True],
    DEVICE: ["gpu", "cuda:0", 3, None, ["cpu"], b"cpu", np.array(["cpu", "cpu"])],
}
# values of a kind that are valid for one particular argument
ACCEPTED = {
    # any NumPy dtype is a valid output dtype of a mask
    ("sequence_mask", "dtype"): (np.int32, object, np.complex64),
    ("sequence_mask", "maxlen"): (None,),  # the longest length
}
# a size that fits the address space but not the memory: MemoryError, as for
# every result NumPy cannot allocate (tests/test_memory.py), before any work
MEMORY_ERROR_OK = {UNSIZED * UNSIZED}
# set_isa's argument is called name; its messages call it the isa
MESSAGE_NAME = {("set_isa", "name"): "isa"}


def _valid_calls():
    z3 = np.zeros((2, 3, 4))
    q = np.zeros((1, 2, 3, 4), np.float32)
    return {
        "masked_softmax": ((z3,), dict(
            scores=ARRAY, attn_mask=OPT_ARRAY, key_lengths=LENGTHS, query_lengths=LENGTHS,
            is_causal=FLAG, causal_alignment=CHOICE, scale=REAL, out=OUT, num_threads=THREADS)),
        "sequence_mask": (([1, 2],), dict(lengths=LENGTHS, maxlen=COUNT, dtype=DTYPE)),
        "apply_sequence_mask": ((z3, [1, 2]), dict(
            x=ARRAY, lengths=LENGTHS, mode=CHOICE, axis=INDEX, out=OUT, num_threads=THREADS)),
        "split_heads": ((z3, 2), dict(x=ARRAY, num_heads=COUNT, out=OUT, num_threads=THREADS)),
        "merge_heads": ((np.zeros((2, 2, 3, 4)),), dict(x=ARRAY, out=OUT, num_threads=THREADS)),
        "sinusoidal_position_encoding": ((3, 4), dict(
            length=COUNT, channels=COUNT, layout=CHOICE, min_timescale=REAL, max_timescale=REAL,
            start_index=INDEX, dtype=DTYPE, out=OUT, num_threads=THREADS, device=DEVICE)),
        "add_position_encoding": ((z3,), dict(
            x=ARRAY, layout=CHOICE, start_index=INDEX, min_timescale=REAL, max_timescale=REAL,
            out=OUT, num_threads=THREADS)),
        "scaled_dot_product_attention": ((q, q, q), dict(
            q=ARRAY, k=ARRAY, v=ARRAY, attn_mask=OPT_ARRAY, key_lengths=LENGTHS,
            query_lengths=LENGTHS, is_causal=FLAG, causal_alignment=CHOICE, scale=OPT_REAL,
            alibi_slopes=OPT_ARRAY, return_weights=FLAG, out=OUT, num_threads=THREADS,
            key_starts=LENGTHS, window=WINDOW, softcap=POSITIVE, sinks=OPT_ARRAY,
            k_scale=OPT_ARRAY, v_scale=OPT_ARRAY)),
        "quantize_kv": ((z3,), dict(x=ARRAY, num_threads=THREADS)),
        "dequantize_kv": ((np.zeros((2, 3, 4), np.int8), np.ones((2, 3), np.float32)), dict(
            values=ARRAY, scales=ARRAY, num_threads=THREADS)),
        "varlen_attention": ((q[0].transpose(1, 0, 2), q[0].transpose(1, 0, 2),
                              q[0].transpose(1, 0, 2), [0, 3], [0, 3]), dict(
            q=ARRAY, k=ARRAY, v=ARRAY, cu_seqlens_q=LENGTHS, cu_seqlens_k=LENGTHS,
            is_causal=FLAG, causal_alignment=CHOICE, window=WINDOW, softcap=POSITIVE,
            sinks=OPT_ARRAY, scale=OPT_REAL, alibi_slopes=OPT_ARRAY, out=OUT,
            num_threads=THREADS)),
        "paged_attention": ((q, np.zeros((3, 4, 2, 4), np.float32), np.zeros((3, 4, 2, 4), np.float32),
                             [[0, 1]], [6]), dict(
            q=ARRAY, key_cache=ARRAY, value_cache=ARRAY, block_tables=LENGTHS, seq_lens=LENGTHS,
            is_causal=FLAG, window=WINDOW, softcap=POSITIVE, sinks=OPT_ARRAY, scale=OPT_REAL,
            alibi_slopes=OPT_ARRAY, out=OUT, num_threads=THREADS, k_scale=OPT_ARRAY, v_scale=OPT_ARRAY)),
        "apply_rotary": ((np.zeros((2, 3, 4)), np.arange(3)), dict(
            x=ARRAY, positions=LENGTHS, layout=CHOICE, base=REAL, out=OUT, num_threads=THREADS)),
        "alibi_slopes": ((4,), dict(num_heads=COUNT, dtype=DTYPE)),
        "set_num_threads": ((1,), dict(n=THREADS)),
        "set_isa": (("scalar",), dict(name=CHOICE)),
    }


VALID = _valid_calls()


def _barrage_cases():
    import inspect
    cases = []
    for fname, (args, kinds) in VALID.items():
        params = list(inspect.signature(getattr(fastattn, fname)).parameters)
        for arg, kind in kinds.items():
            for i, value in enumerate(BAD[kind]):
                if any(value is ok for ok in ACCEPTED.get((fname, arg), ())):
                    continue
                cases.append(pytest.param(fname, arg, params.index(arg), value,
                                          id=f"{fname}-{arg}-{kind}{i}"))
    return cases


def test_barrage_covers_every_public_function_and_argument():
    import inspect
    for name in fastattn.__all__:
        fn = getattr(fastattn, name)
        if not callable(fn) or inspect.isclass(fn) or name in ("get_isa", "get_num_threads", "available_isas",
                                          "show_config"):
            continue
        assert name in VALID, f"no barrage entry for {name}"
        params = set(inspect.signature(fn).parameters)
        assert params == set(VALID[name][1]), f"{name}: arguments {params} != barrage"


@pytest.fixture
def time_limit():
    """Fail instead of hanging: SIGALRM after 20 s."""
    import signal

    def expire(signum, frame):
        raise TimeoutError("the call ran for more than 20 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _call_with(fname, arg, position, value):
    args, _ = VALID[fname]
    args = list(args)
    kwargs = {}
    if position < len(args):
        args[position] = value
    else:
        kwargs[arg] = value
    return getattr(fastattn, fname)(*args, **kwargs)


@pytest.mark.parametrize("fname,arg,position,value", _barrage_cases())
def test_barrage(fname, arg, position, value, time_limit):
    saved = (fastattn.get_isa(), fastattn._config._num_threads)
    try:
        try:
            _call_with(fname, arg, position, value)
        except MemoryError:
            assert type(value) is int and value in MEMORY_ERROR_OK, f"{fname}({arg}={value!r}): MemoryError"
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            named = MESSAGE_NAME.get((fname, arg), arg)
            assert re.search(rf"(?<![A-Za-z_]){re.escape(named)}(?![A-Za-z_])", msg), (
                f"{fname}({arg}={value!r}): the message does not name {named!r}: "
                f"{type(exc).__name__}: {msg}")
        except Exception as exc:  # noqa: BLE001 - any other type is the defect
            pytest.fail(f"{fname}({arg}={value!r}) raised {type(exc).__name__}: {exc}")
        else:
            pytest.fail(f"{fname}({arg}={value!r}) was accepted")
        args, _ = VALID[fname]
        getattr(fastattn, fname)(*args)  # still works: nothing was left half-changed
    finally:
        # set_isa and set_num_threads change global state: restore it
        fastattn.set_isa(saved[0])
        fastattn.set_num_threads(saved[1])


# ---- the barrage on the classes: every constructor and method argument ------------
# The same rule for MultiHeadAttention and KVCache: each bad value raises a
# ValueError or TypeError naming the argument, before anything is allocated
# or changed (the object's state is compared before and after), and the
# valid call still works afterwards.

OPT_COUNT = "opt_count"  # a size, or None for the default
OPT_CHOICE = "opt_choice"
SEED = "seed"
CACHE = "cache"
STATE = "state"
MODULE = "module"
BAD.update({
    OPT_COUNT: [v for v in BAD[COUNT] if v is not None],
    OPT_CHOICE: [v for v in BAD[CHOICE] if v is not None] + [["neox"], {"neox": 1}],
    SEED: ["abc", 2.5, True, object(), [1.5]],
    CACHE: ["abc", 3, object(), np.zeros((2, 4))],
    STATE: [3, "abc", None, [1, 2], {}, {"w_q": "abc"}, {"w_q": np.zeros((1, 1))},
            {"bogus": np.zeros(1)}],
    MODULE: [3, "abc", None, object()],
})
# a cache whose shape does not fit the layer is refused by name too
BAD[CACHE].append("wrong_cache")


def _layer_state(m):
    return {n: None if a is None else a.copy() for n, a in m.state_dict().items()}


def _same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is b
    return np.array_equal(a, b)


def _class_calls():
    """name -> (setup, args, kwargs, kinds). setup() gives (the callable,
    a snapshot function of the state a bad call must leave untouched)."""
    E, H = 8, 2
    x = np.zeros((2, 3, E), np.float32)
    MHA = fastattn.MultiHeadAttention

    def layer():
        return MHA(E, H, seed=0)

    def constructor(cls):
        return lambda: (cls, lambda: None)

    def method(make, name, snapshot):
        def setup():
            obj = make()
            return getattr(obj, name), lambda: snapshot(obj)
        return setup

    def cache():
        c = fastattn.KVCache(2, 4, 2, 4)
        c._lengths[:] = [3, 2]
        return c

    def cache_state(c):
        return {"lengths": c.lengths, "k": c.k.copy(), "v": c.v.copy(), "device": c.device}

    def paged():
        c = fastattn.PagedKVCache(4, 2, 2, 4)
        c.add_sequence()
        c.append(0, np.ones((3, 2, 4), np.float32), np.ones((3, 2, 4), np.float32))
        return c

    def paged_state(c):
        return {"k": c.key_cache.copy(), "v": c.value_cache.copy(), "free": c.num_free_blocks,
                "len": c.seq_len(0)}

    def torch_module():
        torch = pytest.importorskip("torch")
        return torch.nn.MultiheadAttention(E, H)

    w = {"w_q": np.zeros((E, E)), "w_k": np.zeros((E, E)), "w_v": np.zeros((E, E)),
         "w_o": np.zeros((E, E))}
    return {
        "MultiHeadAttention": (constructor(MHA), (E, H), {}, dict(
            embed_dim=COUNT, num_heads=COUNT, num_kv_heads=OPT_COUNT, kdim=OPT_COUNT,
            vdim=OPT_COUNT, bias=FLAG, rope=OPT_CHOICE, rope_base=REAL, dtype=DTYPE, seed=SEED,
            deterministic=FLAG)),
        "MultiHeadAttention.__call__": (method(layer, "__call__", _layer_state), (x,), {}, dict(
            query=ARRAY, key=OPT_ARRAY, value=OPT_ARRAY, key_lengths=LENGTHS,
            query_lengths=LENGTHS, attn_mask=OPT_ARRAY, is_causal=FLAG, return_weights=FLAG,
            cache=CACHE, num_threads=THREADS)),
        "MultiHeadAttention.from_weights": (
            lambda: (MHA.from_weights, lambda: None), tuple(w.values()), {"num_heads": H}, dict(
                w_q=ARRAY, w_k=ARRAY, w_v=ARRAY, w_o=ARRAY, b_q=OPT_ARRAY, b_k=OPT_ARRAY,
                b_v=OPT_ARRAY, b_o=OPT_ARRAY, num_heads=COUNT, num_kv_heads=OPT_COUNT,
                rope=OPT_CHOICE, rope_base=REAL)),
        "MultiHeadAttention.from_torch": (
            lambda: (MHA.from_torch, lambda: None), (torch_module,), {}, dict(module=MODULE)),
        "MultiHeadAttention.load_state_dict": (
            method(layer, "load_state_dict", _layer_state), (layer().state_dict(),), {},
            dict(state=STATE)),
        "MultiHeadAttention.astype": (method(layer, "astype", _layer_state), (np.float16,), {},
                                      dict(dtype=DTYPE)),
        "MultiHeadAttention.new_cache": (method(layer, "new_cache", _layer_state), (2, 4), {},
                                         dict(batch_size=COUNT, max_len=COUNT, kv_dtype=DTYPE)),
        "MultiHeadAttention.to": (method(layer, "to", _layer_state), ("cpu",), {},
                                  dict(device=DEVICE)),
        "KVCache": (constructor(fastattn.KVCache), (2, 4, 2, 4), {}, dict(
            batch_size=COUNT, max_len=COUNT, num_kv_heads=COUNT, head_dim=COUNT, dtype=DTYPE,
            v_head_dim=OPT_COUNT, device=DEVICE, kv_dtype=DTYPE)),
        "KVCache.reset": (method(cache, "reset", cache_state), ([1, 1],), {},
                          dict(lengths=LENGTHS)),
        "KVCache.to": (method(cache, "to", cache_state), ("cpu",), {}, dict(device=DEVICE)),
        "KVCache.append_lengths": (method(cache, "append_lengths", cache_state),
                                   (np.array([1, 2]),), {}, dict(new_tokens=LENGTHS)),
        "PagedKVCache": (constructor(fastattn.PagedKVCache), (4, 2, 2, 4), {}, dict(
            num_blocks=COUNT, block_size=COUNT, num_kv_heads=COUNT, head_dim=COUNT,
            value_dim=OPT_COUNT, dtype=DTYPE, rope=OPT_CHOICE, rope_base=REAL, kv_dtype=DTYPE)),
        "PagedKVCache.append": (method(paged, "append", paged_state),
                                (0, np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32)),
                                {}, dict(seq=INDEX, key=ARRAY, value=ARRAY)),
        "PagedKVCache.seq_len": (method(paged, "seq_len", paged_state), (0,), {}, dict(seq=INDEX)),
        "PagedKVCache.fork": (method(paged, "fork", paged_state), (0,), {}, dict(seq=INDEX)),
        "PagedKVCache.free": (method(paged, "free", paged_state), (0,), {}, dict(seq=INDEX)),
        "PagedKVCache.tables": (method(paged, "tables", paged_state), ([0],), {},
                                dict(seqs=LENGTHS)),
    }


CLASS_CALLS = _class_calls()
# methods whose one argument is a file path: the OS and NumPy's file errors
# (FileNotFoundError, IsADirectoryError, ...) are the right ones there
PATH_METHODS = {"MultiHeadAttention.save", "MultiHeadAttention.load"}


def _class_barrage_cases():
    import inspect
    cases = []
    for name, (setup, args, kwargs, kinds) in CLASS_CALLS.items():
        cls_name, _, meth = name.partition(".")
        target = getattr(fastattn, cls_name)
        fn = target if not meth else getattr(target, meth)
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        for arg, kind in kinds.items():
            for i, value in enumerate(BAD[kind]):
                cases.append(pytest.param(name, arg, params.index(arg), value,
                                          id=f"{name}-{arg}-{kind}{i}"))
    return cases


def test_class_barrage_covers_every_constructor_and_method_argument():
    import inspect
    for cls_name in ("MultiHeadAttention", "KVCache", "PagedKVCache"):
        cls = getattr(fastattn, cls_name)
        members = {"": cls}
        members.update({n: m for n, m in vars(cls).items()
                        if (not n.startswith("_") or n == "__call__") and callable(
                            m.__func__ if isinstance(m, (classmethod, staticmethod)) else m)})
        for meth, fn in members.items():
            name = f"{cls_name}.{meth}" if meth else cls_name
            fn = getattr(cls, meth) if meth else fn
            params = {p for p in inspect.signature(fn).parameters if p != "self"}
            if not params or name in PATH_METHODS:
                continue
            assert name in CLASS_CALLS, f"no barrage entry for {name}"
            assert params == set(CLASS_CALLS[name][3]), f"{name}: arguments {params} != barrage"


@pytest.mark.parametrize("name,arg,position,value", _class_barrage_cases())
def test_class_barrage(name, arg, position, value, time_limit):
    setup, args, kwargs, _ = CLASS_CALLS[name]
    fn, snapshot = setup()
    args = [a() if callable(a) and not isinstance(a, type) and a.__name__ == "torch_module" else a
            for a in args]
    if isinstance(value, str) and value == "wrong_cache":
        value = fastattn.KVCache(2, 8, 1, 4)  # the layer needs 2 kv heads of dim 4
    call_args, call_kwargs = list(args), dict(kwargs)
    if position < len(call_args):
        call_args[position] = value
    else:
        call_kwargs[arg] = value
    before = snapshot()
    try:
        fn(*call_args, **call_kwargs)
    except MemoryError:
        assert type(value) is int and value in MEMORY_ERROR_OK, f"{name}({arg}={value!r}): MemoryError"
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        assert re.search(rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])", msg), (
            f"{name}({arg}={value!r}): the message does not name {arg!r}: "
            f"{type(exc).__name__}: {msg}")
    except Exception as exc:  # noqa: BLE001 - any other type is the defect
        pytest.fail(f"{name}({arg}={value!r}) raised {type(exc).__name__}: {exc}")
    else:
        pytest.fail(f"{name}({arg}={value!r}) was accepted")
    assert _same_state(snapshot(), before), f"{name}({arg}={value!r}) changed the object"
    fn(*args, **kwargs)  # still works


@pytest.mark.parametrize("B, H", [(2, 3), (20, 16)], ids=["few", "over-256"])
def test_length_bounds_from_small_and_large_arrays(B, H):
    """Lengths are bounds-checked from a list (small arrays) or by NumPy
    reductions (large ones): both name the argument and the offending value,
    and the per-sequence form reaches the kernel as a read-only zero-stride
    view that gives the oracle's result."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((B, H, 3, 4)).astype(np.float32)
    kl = rng.integers(1, 6, size=(B, H))
    sdpa = fastattn.scaled_dot_product_attention
    bad = kl.copy()
    bad[-1, -1] = -1
    with pytest.raises(ValueError, match=r"key_lengths must be non-negative, got min -1"):
        sdpa(q, q[:, :, :1].repeat(5, 2), q[:, :, :1].repeat(5, 2), key_lengths=bad)
    bad[-1, -1] = 7
    with pytest.raises(ValueError, match=r"key_lengths must be <= the key length 5, got max 7"):
        sdpa(q, q[:, :, :1].repeat(5, 2), q[:, :, :1].repeat(5, 2), key_lengths=bad)
    with pytest.raises(ValueError, match=r"too large for int64"):
        sdpa(q, q, q, key_lengths=np.full(B, 2**63, dtype=np.uint64))
    k = rng.standard_normal((B, H, 5, 4)).astype(np.float32)
    per_seq = kl[:, 0]
    got = sdpa(q, k, k, key_lengths=per_seq, query_lengths=np.minimum(per_seq, 3))
    want = ref.scaled_dot_product_attention(q, k, k, key_lengths=per_seq,
                                            query_lengths=np.minimum(per_seq, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    view = _validation.lengths_view(per_seq, "key_lengths", (B, H), B, H, 5, "key")
    assert view.strides[1] == 0 and not view.flags.writeable and (view == per_seq[:, None]).all()
