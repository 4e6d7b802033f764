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
