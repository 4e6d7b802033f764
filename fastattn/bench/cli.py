"""Command line of the benchmark suite: ``python -m fastattn.bench``
(also installed as ``fastattn-bench``)."""

import argparse
import shlex
import sys

from fastattn.bench.cases import CASES, REGISTRY, Shape, default_cases
from fastattn.bench.peers import PEER_ALIASES, PEERS

EPILOG = """\
cases (* = not in the default suite; select them with --cases):
{cases}
peers: numpy (the oracle, always available), torch (pip install torch),
       onnxruntime (pip install onnxruntime onnx); a missing peer is skipped.

Every output is checked against the NumPy oracle before it is timed (the
greedy rows: against the float32 cache's tokens, at 99% of the positions); a
mismatch is reported loudly and makes the exit status 1. Exit status 2 means
bad options.

examples:
  python -m fastattn.bench
  python -m fastattn.bench --quick
  python -m fastattn.bench --cases decode,greedy --threads 2
  python -m fastattn.bench --cases decode_lengths --threads 2 --plot decode.png
  python -m fastattn.bench --cases sdpa,causal --shapes 1x16x2048x64 --threads 2 --out bench-out
  python -m fastattn.bench --cases gil --threads 1
"""


def _case_lines():
    defaults = default_cases()
    width = max(len(n) for n in CASES) + 2
    return "\n".join(f"  {name + ('' if name in defaults else '*'):<{width}}{text}"
                     for name, text in CASES.items())


def _list(choices, aliases=None, what="value"):
    aliases = aliases or {}

    def parse(text):
        items = [t.strip().lower() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        out = []
        for item in items:
            item = aliases.get(item, item)
            if item not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {item!r}; choose from {', '.join(choices)}")
            if item not in out:
                out.append(item)
        return out
    return parse


def _shapes(text):
    try:
        return [Shape.parse(t) for t in text.replace(";", " ").split() if t] or _empty()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _empty():
    raise ValueError("empty shape list")


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastattn.bench",
        description="Benchmark fastattn against the NumPy oracle, torch and onnxruntime, "
                    "with the machine's matmul and bandwidth roofline.",
        epilog=EPILOG.format(cases=_case_lines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=_list(list(CASES), what="case"), default=default_cases(),
                        metavar="LIST",
                        help="comma-separated cases to run (default: all those without *)")
    parser.add_argument("--peers", type=_list(list(PEERS), PEER_ALIASES, what="peer"),
                        default=list(PEERS), metavar="LIST",
                        help="comma-separated peers (default: numpy,torch,onnxruntime)")
    parser.add_argument("--shapes", type=_shapes, default=None, metavar="'BxHxSxD ...'",
                        help="shapes for every selected case instead of their defaults, "
                             "space- or semicolon-separated, e.g. '1x12x512x64 8x12x128x64'; "
                             "H/Hkv gives kv heads (decode, decode_lengths, greedy), "
                             "e.g. '1x32/8x8192x128'")
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"],
                        default="float32",
                        help="the inputs' dtype; bfloat16 needs ml_dtypes (cases without a "
                             "16-bit path report n/a)")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="threads for fastattn and every peer (default: fastattn's default)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and short timing (a smoke run, < 20 s)")
    parser.add_argument("--out", metavar="DIR",
                        help="write results.json, results.md and results.png (matplotlib) to DIR")
    parser.add_argument("--plot", metavar="FILE",
                        help="draw decode time against cache length per kv_dtype beside torch "
                             "into FILE (matplotlib; needs the decode_lengths or decode case)")
    return parser


PLOT_CASES = ("decode_lengths", "decode")


def _check_combination(parser, args):
    """Options that parse but do not go together: argparse's usage error."""
    kv_shapes = [str(s) for s in args.shapes or () if s.Hkv is not None]
    plain = [c for c in args.cases if not REGISTRY[c].kv_heads]
    if kv_shapes and plain:
        parser.error(f"--shapes {' '.join(kv_shapes)}: kv heads (H/Hkv) are read only by "
                     f"the decode, decode_lengths and greedy cases, not by {', '.join(plain)}")
    if args.plot and not any(c in args.cases for c in PLOT_CASES):
        parser.error("--plot draws the decode rows: add --cases decode_lengths (or decode)")


def main(argv=None):
    """Run the suite; returns the exit status (0 ok, 1 a check failed, 2 bad options)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_combination(parser, args)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for bad options
        return exc.code

    import fastattn
    from fastattn.bench import report
    from fastattn.bench.runner import Config, run_suite

    config = Config(cases=args.cases, peers=args.peers, dtype=args.dtype,
                    threads=args.threads or fastattn.get_num_threads(), quick=args.quick,
                    shapes=args.shapes,
                    command=" ".join(["python -m fastattn.bench"] + [shlex.quote(a) for a in argv]))
    reporter = report.Reporter()
    results = run_suite(config, reporter)
    report.print_table(results)
    if args.out:
        written = report.write_outputs(results, args.out, reporter)
        reporter.note(f"wrote {', '.join(written)} to {args.out}")
    if args.plot:
        if report.write_decode_plot(results, args.plot, reporter):
            reporter.note(f"wrote {args.plot}")
    return 1 if results["failed"] else 0

