"""Progress, the terminal table and the files written by ``--out``.

``rich`` draws the progress bar and the table when it is installed
(``pip install 'fastattn[bench]'``); otherwise both fall back to plain
text. ``results.png`` needs matplotlib and is skipped, with a note,
without it.
"""

import contextlib
import json
import os
import sys

UNIT_NAMES = {"flop": "GFLOP/s", "byte": "GB/s", "call": "calls/s"}
BUSY_MARK = "*"


def _rich():
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- progress

class Reporter:
    """Messages and progress on stderr; rich when available and stderr is a
    terminal, plain lines otherwise."""

    def __init__(self, stream=None, fancy=None):
        self.stream = stream or sys.stderr
        if fancy is None:
            fancy = _rich() and getattr(self.stream, "isatty", lambda: False)()
        self.fancy = fancy
        self._console = None
        if fancy:
            from rich.console import Console

            self._console = Console(file=self.stream)

    def note(self, text):
        if self._console:
            self._console.print(f"[dim]{text}[/dim]", highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def alarm(self, text):
        """A loud message: a check failed."""
        banner = "!" * 72
        if self._console:
            self._console.print(f"[bold red]{banner}\nCHECK FAILED: {text}\n{banner}[/bold red]",
                                highlight=False)
        else:
            print(f"{banner}\nCHECK FAILED: {text}\n{banner}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def progress(self, total):
        if self._console:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)

            with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=self._console, transient=True) as bar:
                task = bar.add_task("fastattn.bench", total=total)
                yield _RichSteps(bar, task)
        else:
            yield _PlainSteps(total, self.stream)


class _RichSteps:
    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def step(self, text):
        self.bar.update(self.task, description=text)

    def done(self):
        self.bar.advance(self.task)


class _PlainSteps:
    def __init__(self, total, stream):
        self.total, self.stream, self.count = total, stream, 0

    def step(self, text):
        self.count += 1
        width = len(str(self.total))
        print(f"[{self.count:>{width}}/{self.total}] {text}", file=self.stream, flush=True)

    def done(self):
        pass


# ---------------------------------------------------------------- figures

def format_seconds(t):
    if t is None:
        return ""
    if t < 1e-3:
        return f"{t * 1e6:.3g} µs"
    if t < 1.0:
        return f"{t * 1e3:.3g} ms"
    return f"{t:.3g} s"


def _peer_cell(impl):
    if impl is None:  # the row asks no peer (e.g. the gil case)
        return "—"
    status = impl["status"]
    if status == "ok":
        t = impl["timing"]["median"]
        speed = impl.get("speedup")
        return f"{format_seconds(t)} ×{speed:.2f}" if speed else format_seconds(t)
    return {"n/a": "—", "mismatch": "MISMATCH", "error": "ERROR"}.get(status, status)


def _rate_cell(row, fa):
    if fa.get("share") is None:
        return ""
    mark = BUSY_MARK if row.get("busy") else ""
    return f"{fa['rate']:.3g} {UNIT_NAMES[row['unit']]} ({100 * fa['share']:.0f}%){mark}"


def table(results):
    """``(header, rows)`` of strings: the terminal and markdown table.

    A peer's cell is its median time and ``×`` its time over fastattn's;
    ``*`` after the roofline share marks a row taken while the machine was
    busy."""
    peers = list(results["peers"])
    header = ["case", "shape", "fastattn ±IQR", "rate (roofline)"] + peers + ["check"]
    out = []
    for row in results["rows"]:
        cells = [row["label"], row["shape"]]
        fa = row["impls"].get("fastattn")
        if row["status"] == "n/a":
            out.append(cells + ["n/a", ""] + ["" for _ in peers] + ["n/a (see notes)"])
            continue
        if fa and fa["status"] == "ok":
            t = fa["timing"]
            cells += [f"{format_seconds(t['median'])} ±{100 * t['spread']:.0f}%", _rate_cell(row, fa)]
        else:
            cells += [(fa or {}).get("status", "error").upper(), ""]
        for p in peers:
            impl = row["impls"].get(p)
            cells.append(_peer_cell(impl) if results["peers"][p]["available"] else "skipped")
        if row["status"] == "failed":
            bad = [n for n, i in row["impls"].items() if i["status"] in ("mismatch", "error")]
            cells.append("FAILED: " + ", ".join(bad))
        else:
            cells.append("ok")
        out.append(cells)
    return header, out


def plain_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep] + body)


def markdown_table(header, rows):
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def summary_lines(results):
    """The machine, the ceilings and the thread count, as short lines."""
    m, roof, cfg = results["machine"], results["roofline"], results["config"]
    load = ""
    if m.get("load_average_before") is not None:
        load = (f"; 1-min load average {m['load_average_before']} before, "
                f"{m['load_average_after']} after the run")
        if m["load_average_before"] >= 0.5:
            load += (" (the CPUs were already busy: times are inflated, multi-threaded "
                     "ones most)")
    return [
        f"machine: {m['cpu']}, {m['cpus_in_affinity']} CPUs in affinity "
        f"({m['logical_cpus']} logical), {m['memory_gib']} GiB, {m['platform']}{load}",
        f"fastattn {results['fastattn_version']}: ISA {cfg['isa_selected']}, "
        f"OpenMP {'on' if cfg['openmp'] else 'off'}; {results['threads']} "
        f"thread{'s' if results['threads'] != 1 else ''} for every implementation; "
        f"dtype {results['dtype']}",
        f"roofline: {roof['dtype']} matmul {roof['matmul_gflops']:.1f} GFLOP/s "
        f"({'fastattn packed 16-bit GEMM' if roof['dtype'] in ('bfloat16', 'float16') else 'NumPy'} "
        f"{roof['matmul_size']}²), read bandwidth {roof['read_gbs']:.1f} GB/s "
        f"(gemv over {roof['read_bytes'] >> 20} MiB){_probe_text(roof)}",
    ]


def _probe_text(roof):
    if not roof.get("probes") or roof["probes"] < 2:
        return ""
    mm, rd = roof["matmul_gflops_range"], roof["read_gbs_range"]
    return (f"; best of {roof['probes']} probes, one before the rows and one after each "
            f"(matmul {mm[0]:.1f}..{mm[1]:.1f}, read {rd[0]:.1f}..{rd[1]:.1f})")


def busy_lines(results):
    """Why each busy row was marked."""
    rows = [r for r in results["rows"] if r.get("busy")]
    if not rows:
        return []
    frac = results["roofline"].get("busy_fraction")
    head = (f"{BUSY_MARK} taken while the machine was busy (the roofline probes just before "
            f"and after the row differ by more than {100 * frac:.0f}%, or the share exceeds "
            "100%); rerun on a quieter machine:") if frac is not None else f"{BUSY_MARK} busy:"
    return [head] + [f"  {r['label']} {r['shape']}: {r['busy_reason']}" for r in rows]


def comparison_lines(results):
    """Same-run time ratios, baselines and metrics, one line each."""
    lines = []
    for r in derived_ratios(results):
        text = ", ".join(f"{k} {v:.2f}" for k, v in r["time_ratio"].items())
        lines.append(f"{r['what']} time at {r['shape']}: {text}")
    for row in results["rows"]:
        if row.get("params", {}).get("kv_dtype"):
            continue  # in the decode table (decode_lines)
        where = f"{row['label']} {row['shape']}"
        for name, b in row.get("baselines", {}).items():
            text = (f"{where}: {name} takes {format_seconds(b['timing']['median'])}; "
                    f"fastattn takes {b['ratio']:.2f}x its time")
            if b.get("share") is not None:
                text += f", runs at {100 * b['share']:.0f}% of its rate"
            lines.append(text)
        for name, m in row.get("metrics", {}).items():
            lines.append(f"{where}: {name} {m['text']}")
    return lines


def note_lines(results):
    """Rows that did not run, and why."""
    return [f"{r['label']} {r['shape']}: {r['note']}" for r in results["rows"]
            if r["status"] == "n/a"]


# (what, label of the row, label of the row it is compared with)
DERIVED = (("causal / non-causal", "sdpa causal", "sdpa"),
           ("half padded / unpadded", "sdpa padded", "sdpa"),
           ("layer half padded / unpadded", "mha padded", "mha"))


def derived_ratios(results):
    """fastattn's and each peer's causal/non-causal and padded/unpadded
    time at the shapes that ran both ways."""
    by_key = {(r["label"], r["shape"]): r for r in results["rows"]}
    out = []
    for what, label, base_label in DERIVED:
        for (lab, shape), row in by_key.items():
            base = by_key.get((base_label, shape))
            if lab != label or base is None:
                continue
            ratios = {}
            for name, impl in sorted(row["impls"].items(), key=lambda kv: kv[0] != "fastattn"):
                b = base["impls"].get(name)
                if impl.get("timing") and b and b.get("timing"):
                    ratios[name] = impl["timing"]["median"] / b["timing"]["median"]
            if ratios:
                out.append({"what": what, "shape": shape, "time_ratio": ratios})
    return out


def decode_table(results):
    """``(header, rows)``: the decode rows (a ``kv_dtype`` in their params)
    per shape and kv_dtype: fastattn's median time, the cache's MiB, GB/s,
    the share of the read of the same buffers timed in the same rounds, the
    time over the full-precision cache's, the cosine to its output, torch
    on the same storage (its time and its time over fastattn's
    full-precision one) and the targets missed. Empty without decode rows."""
    from fastattn.bench.cases import (COSINE_TARGETS, READ_BASELINE, READ_SHARE_TARGET,
                                      TIME_RATIO_TARGETS)

    rows = [r for r in results["rows"]
            if r.get("params", {}).get("kv_dtype") and not r["params"].get("greedy")]
    full = results.get("dtype", "float32")
    by_key = {(r["case"], r["shape"], r["params"]["kv_dtype"]): r for r in rows}
    header = ["shape", "kv_dtype", "fastattn", "MiB", "GB/s", "of read", f"x {full}", "cosine",
              "torch", f"torch x {full}", "targets"]
    out = []
    for r in rows:
        kv, p = r["params"]["kv_dtype"], r["params"]
        cells = [r["shape"] if kv == full else "", kv]
        fa = r["impls"].get("fastattn") or {}
        if not fa.get("timing"):
            note = r.get("note") or fa.get("note") or fa.get("status", "")
            out.append(cells + [r["status"] if r["status"] != "ok" else "", "", "", "", "", "",
                                "", "", note])
            continue
        t = fa["timing"]["median"]
        base = by_key.get((r["case"], r["shape"], full), {}).get("impls", {}).get("fastattn") or {}
        t_full = (base.get("timing") or {}).get("median")
        read = r.get("baselines", {}).get(READ_BASELINE) or {}
        share = read.get("share")
        cos = next((m["value"] for name, m in r.get("metrics", {}).items()
                    if name.startswith("cosine")), None)
        ratio = t / t_full if t_full else None
        torch = r["impls"].get("torch") or {}
        t_torch = (torch.get("timing") or {}).get("median")
        missed = []
        if kv == full and share is not None and share < READ_SHARE_TARGET:
            missed.append(f"read {100 * share:.0f}% < {100 * READ_SHARE_TARGET:.0f}%")
        if ratio is not None and kv in TIME_RATIO_TARGETS and ratio > TIME_RATIO_TARGETS[kv]:
            missed.append(f"time {ratio:.2f}x > {TIME_RATIO_TARGETS[kv]:.2f}x")
        if cos is not None and kv in COSINE_TARGETS and cos < COSINE_TARGETS[kv]:
            missed.append(f"cosine < {COSINE_TARGETS[kv]:g}")
        checked = kv == full or kv in TIME_RATIO_TARGETS or kv in COSINE_TARGETS
        cells += [format_seconds(t), f"{p['cache_bytes'] / 2**20:.1f}", f"{fa['rate']:.1f}",
                  "" if share is None else f"{100 * share:.0f}%",
                  "" if ratio is None else f"{ratio:.2f}",
                  "" if cos is None else f"{cos:.8f}",
                  format_seconds(t_torch) if t_torch else "",
                  f"{t_torch / t_full:.2f}" if t_torch and t_full else "",
                  ("missed: " + "; ".join(missed)) if missed else ("met" if checked else "")]
        out.append(cells)
    return header, out


DECODE_TITLE = "decode (1 query; the same q, K and V in every kv_dtype):"


def decode_legend(results):
    """What the decode table's columns are, and the targets."""
    from fastattn.bench.cases import COSINE_TARGETS, READ_SHARE_TARGET, TIME_RATIO_TARGETS

    full = results.get("dtype", "float32")
    return [f"fastattn: median time; MiB: the cache read (K, V and the int8 scales); "
            f"of read: GB/s over the rate of a threaded read of the same buffers timed "
            f"in the same rounds; x {full}: time over the {full} cache's; cosine: the "
            f"output against the {full} cache's; torch: SDPA on the same storage "
            f"(bfloat16: q, K, V in bfloat16), and its time over fastattn's {full} time.",
            f"targets: {full} >= {100 * READ_SHARE_TARGET:.0f}% of the read; "
            + ", ".join(f"{k} <= {v:.2f}x" for k, v in TIME_RATIO_TARGETS.items())
            + f" the {full} time; cosine "
            + ", ".join(f"{k} >= {v:g}" for k, v in COSINE_TARGETS.items()) + "."]


def greedy_lines(results):
    """The greedy rows' agreement with the float32 cache, one line each."""
    lines = []
    for r in results["rows"]:
        if not r.get("params", {}).get("greedy"):
            continue
        where = f"{r['label']} ({r['dims']})"
        if r["status"] == "n/a":
            lines.append(f"{where}: n/a, {r['note']}")
        metrics = [f"{name} {m['text']}" for name, m in r.get("metrics", {}).items()]
        if metrics:
            lines.append(f"{where}: " + "; ".join(metrics))
        if r["status"] == "failed":
            notes = [i.get("note") for i in r["impls"].values() if i.get("note")]
            lines.append(f"{where}: FAILED: {'; '.join(notes)}")
    return lines


def decode_lines(results):
    """The decode table with its legend, then the greedy lines; empty when
    neither ran."""
    lines = []
    header, rows = decode_table(results)
    if rows:
        lines += [DECODE_TITLE, plain_table(header, rows)]
        lines += [f"  {line}" for line in decode_legend(results)]
    greedy = greedy_lines(results)
    if greedy:
        lines += ["end to end:"] + [f"  {line}" for line in greedy]
    return lines


def markdown(results):
    header, rows = table(results)
    parts = ["# fastattn benchmark", ""]
    parts += [f"- {line}" for line in summary_lines(results)]
    parts += [f"- command: `{results['command']}` ({results['seconds']} s, {results['date']})", ""]
    parts += [markdown_table(header, rows), ""]
    parts += [
        "Times are medians; ± is the interquartile range over the median. "
        "A peer's × is its time over fastattn's: above 1, fastattn is faster. "
        "Rates count useful work only (unmasked query-key pairs; bytes that must move); "
        "roofline is the share of the matmul rate (GFLOP/s) or the read bandwidth (GB/s) "
        "measured in the same run (the best of the probes taken between the rows). Every output was checked against the NumPy oracle "
        f"before timing (fastattn at rtol {results['tolerance']['fastattn_rtol']:g}, "
        f"peers at {results['tolerance']['peer_rtol']:g}).",
        "",
    ]
    comparisons = comparison_lines(results)
    if comparisons:
        parts += ["Same-run comparisons:", ""] + [f"- {line}" for line in comparisons] + [""]
    header, rows = decode_table(results)
    if rows:
        parts += [DECODE_TITLE[0].upper() + DECODE_TITLE[1:], "", markdown_table(header, rows),
                  ""] + decode_legend(results) + [""]
    greedy = greedy_lines(results)
    if greedy:
        parts += ["End to end:", ""] + [f"- {line}" for line in greedy] + [""]
    busy = busy_lines(results)
    if busy:
        parts += [busy[0], ""] + [f"- {line.strip()}" for line in busy[1:]] + [""]
    notes = [f"- {name}: {p['description']} ({p['version']})" for name, p in results["peers"].items()
             if p["available"]]
    notes += [f"- {name} skipped: {p['reason']}" for name, p in results["peers"].items()
              if not p["available"]]
    notes += [f"- {line}" for line in note_lines(results)]
    if notes:
        parts += ["Peers and notes:", ""] + notes + [""]
    if results["failed"]:
        parts += ["**FAILED checks:** " + ", ".join(results["failed"]), ""]
    return "\n".join(parts)


def print_table(results, stream=None):
    stream = stream or sys.stdout
    header, rows = table(results)
    if _rich():
        from rich.console import Console
        from rich.table import Table

        t = Table(title="fastattn benchmark", title_justify="left")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i < 2 or h == "check" else "right",
                         overflow="fold")
        for r in rows:
            style = "bold red" if r[-1].startswith("FAILED") else None
            t.add_row(*r, style=style)
        tty = getattr(stream, "isatty", lambda: False)()
        console = Console(file=stream, width=None if tty else 200)
        console.print(t)
        for line in _trailer(results):
            console.print(line, highlight=False, markup=False)
    else:
        print(plain_table(header, rows), file=stream)
        for line in _trailer(results):
            print(line, file=stream)
    if results["failed"]:
        print(f"FAILED checks: {', '.join(results['failed'])}", file=stream)


def _trailer(results):
    comparisons = comparison_lines(results)
    return (summary_lines(results) + note_lines(results) + busy_lines(results)
            + (["same-run comparisons:"] + [f"  {c}" for c in comparisons] if comparisons else [])
            + decode_lines(results))


def write_outputs(results, out_dir, reporter=None):
    """Write results.json, results.md and (with matplotlib) results.png."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(results, derived=derived_ratios(results)), f, indent=2, default=str)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    written = ["results.json", "results.md"]
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if reporter:
            reporter.note("results.png not written: it needs matplotlib (pip install matplotlib)")
        return written
    from fastattn.plotting import speedup_chart

    fig = Figure(figsize=(8, 0.9 + 0.38 * max(1, len(results["rows"]))))
    speedup_chart(results, ax=fig.add_subplot())
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=100, bbox_inches="tight")
    return written + ["results.png"]


def write_decode_plot(results, path, reporter=None):
    """Draw :func:`fastattn.plotting.decode_chart` into ``path``; False
    (with a note) without matplotlib or without timed decode rows."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if reporter:
            reporter.note(f"{path} not written: it needs matplotlib (pip install matplotlib)")
        return False
    from fastattn.plotting import decode_chart

    fig = Figure(figsize=(6.4, 4.4))
    try:
        decode_chart(results, ax=fig.add_subplot())
    except ValueError as exc:
        if reporter:
            reporter.note(f"{path} not written: {exc}")
        return False
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return True
