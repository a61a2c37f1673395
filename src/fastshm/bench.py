"""``fastshm bench``: run the benchmark suite and report it.

Runs the pytest-benchmark suite in the repository's ``bench/`` folder (or reads a JSON file
it wrote), prints tables of medians with the ratio of fastshm to every baseline, checks the
targets of the benchmark issue, and writes a PNG chart (latency and throughput against
payload size, log-log) when matplotlib is installed.

Examples
--------
``python -m fastshm bench --quick``
    about a minute: 64 B, 64 KiB and 6.2 MB, cross-core.
``python -m fastshm bench``
    the full matrix (six sizes, touch/full latency and streaming, cross- and same-core).
``python -m fastshm bench --from-json .benchmarks/fastshm-bench.json``
    report an earlier run again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = ["add_arguments", "run", "load", "report", "targets", "chart", "Result"]

#: system name -> (role, transport); systems unknown here are shown as baselines
LIMITS = ("memcpy", "bare-tcp", "bare-unix")
FRAME_1080P = 1920 * 1080 * 3


class Result:
    """One benchmark: a system at one size, kind, mode and placement."""

    __slots__ = ("system", "role", "transport", "size", "kind", "mode", "placement",
                 "median", "per_message", "rounds", "iqr")

    def __init__(self, entry: Dict[str, Any]) -> None:
        info = entry["extra_info"]
        stats = entry["stats"]
        self.system: str = info["system"]
        self.role: str = info.get("role", "baseline")
        self.transport: str = info.get("transport", "")
        self.size: int = int(info["size"])
        self.kind: str = info["kind"]
        self.mode: str = info.get("mode", "")
        self.placement: str = info.get("placement", "")
        self.median: float = float(stats["median"])
        self.rounds: int = int(stats.get("rounds", 0))
        self.iqr: float = float(stats.get("iqr", 0.0))
        per_call = max(1, int(info.get("messages_per_call", 1)))
        self.per_message: float = self.median / per_call

    @property
    def one_way(self) -> float:
        """RTT / 2 for a ping-pong (as the issue defines one-way), the copy for memcpy."""
        return self.median / 2 if self.kind == "latency" else self.median

    @property
    def msgs_per_s(self) -> float:
        return 1.0 / self.per_message if self.per_message > 0 else math.nan

    @property
    def gb_per_s(self) -> float:
        return self.size * self.msgs_per_s / 1e9


# ------------------------------------------------------------------ loading
def load(path: str) -> Tuple[List[Result], Dict[str, Any]]:
    """Results and machine info of a pytest-benchmark JSON file of the suite."""
    with open(path) as f:
        data = json.load(f)
    results = [Result(b) for b in data.get("benchmarks", []) if "system" in b.get("extra_info", {})]
    return results, data.get("machine_info", {})


def find_bench_dir(explicit: Optional[str]) -> Path:
    """The suite's folder: ``--bench-dir``, ``./bench``, or the source tree's ``bench``."""
    candidates = [Path(explicit)] if explicit else [
        Path.cwd() / "bench", Path(__file__).resolve().parents[2] / "bench"]
    for c in candidates:
        if (c / "test_bench.py").is_file():
            return c
    raise SystemExit("fastshm bench: no benchmark suite found (looked in "
                     + ", ".join(str(c) for c in candidates)
                     + "); run it from a source checkout or pass --bench-dir")


def run_suite(bench_dir: Path, out_json: Path, profile: str, extra: List[str],
              log_path: Path) -> int:
    """Run pytest on the suite; its output goes to ``log_path``. Returns pytest's status."""
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "--benchmark-only", "-q",
           "-p", "no:cacheprovider", f"--benchmark-json={out_json}"]
    if profile != "full":
        cmd.append(f"--bench-{profile}")
    cmd += extra
    print("running:", " ".join(cmd), file=sys.stderr)
    print(f"(pytest output in {log_path})", file=sys.stderr)
    started = time.monotonic()
    with open(log_path, "w") as log:
        status = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=str(bench_dir.parent))
    print(f"suite finished in {time.monotonic() - started:.0f} s with status {status}",
          file=sys.stderr)
    if status not in (0,):
        with open(log_path) as log:
            tail = log.readlines()[-30:]
        sys.stderr.write("".join(tail))
    return status


# ------------------------------------------------------------------ formatting
def size_label(size: int) -> str:
    if size >= 1_000_000 and size % (1 << 20):
        return f"{size / 1e6:.1f} MB"
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def _fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    us = seconds * 1e6
    if us < 100:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def _fmt_rate(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"


def _table(title: str, header: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [title]
    lines.append("  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                           for i, h in enumerate(header)))
    for r in rows:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)))
    return lines + [""]


def _order(results: Iterable[Result]) -> List[str]:
    rank = {"fastshm": 0, "baseline": 1, "limit": 2}
    seen: Dict[str, Tuple[int, int]] = {}
    for i, r in enumerate(results):
        seen.setdefault(r.system, (rank.get(r.role, 1), i))
    return sorted(seen, key=lambda s: seen[s])


Index = Dict[Tuple[str, str, str, str, int], Result]


def _index(results: List[Result]) -> Index:
    idx: Index = {}
    for r in results:
        idx[(r.kind, r.mode, r.placement, r.system, r.size)] = r
    return idx


def _memcpy(idx: Index, size: int) -> Optional[Result]:
    for (kind, _m, _p, system, s), r in idx.items():
        if kind == "memcpy" and s == size:
            return r
    return None


def _limit(idx: Index, placement: str, transport: str, size: int) -> Optional[float]:
    """The physical limit of a ping-pong carrying ``size`` bytes, on the RTT/2 scale.

    One copy of the payload (memcpy) plus a bare 64-byte socket round trip of the
    transport, halved like every other ping-pong: ``(memcpy + bare RTT) / 2``.
    """
    m = _memcpy(idx, size)
    hop = idx.get(("latency", "touch", placement, f"bare-{transport}", 64))
    if m is None or hop is None:
        return None
    return (m.median + hop.median) / 2


def report(results: List[Result], machine: Dict[str, Any]) -> str:
    """The text report: medians, ratios of fastshm to every baseline, targets."""
    idx = _index(results)
    sizes = sorted({r.size for r in results})
    placements = [p for p in ("cross", "same", "none") if any(r.placement == p for r in results)]
    fastshm_systems = [s for s in _order(results)
                       if any(r.system == s and r.role == "fastshm" for r in results)]
    info = machine.get("fastshm_bench", {})
    out: List[str] = []
    out.append(
        f"fastshm bench: {info.get('cpu_model') or machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"{info.get('cpu_count', '?')} CPUs, Linux {info.get('kernel', '?')}, "
        f"Python {machine.get('python_version', '?')}, fastshm {info.get('fastshm', '?')}, "
        f"profile {info.get('profile', '?')}")
    if info.get("loadavg_start"):
        out.append(f"load average (1/5/15 min) at start {info['loadavg_start']}, at end "
                   f"{info.get('loadavg_end')}: above ~2 means other work shared the CPUs")
    out.append("placement: cross = producer and consumer pinned to different CPUs, same = both "
               "pinned to one CPU, none = not pinned; medians of every round")
    out.append("limit-tcp / limit-unix = (one memcpy of the payload + a bare 64-byte socket "
               "round trip) / 2: the best a ping-pong carrying the payload can do")
    out.append("")
    size_hdr = [size_label(s) for s in sizes]

    for placement in placements:
        for mode in ("touch", "full"):
            rows_sys = [s for s in _order(results)
                        if any(r.kind == "latency" and r.mode == mode and r.placement == placement
                               and r.system == s for r in results)]
            if not rows_sys:
                continue
            rows: List[List[str]] = []
            for s in rows_sys:
                rows.append([s] + [_fmt_time(idx[("latency", mode, placement, s, z)].one_way)
                                   if ("latency", mode, placement, s, z) in idx else "-"
                                   for z in sizes])
            limit_rows = [t for t in ("tcp", "unix")
                          if any(_limit(idx, placement, t, z) is not None for z in sizes)]
            for t in limit_rows:
                rows.append([f"limit-{t}"] + [
                    _fmt_time(v) if (v := _limit(idx, placement, t, z)) is not None else "-"
                    for z in sizes])
            out += _table(f"Latency, one way (RTT/2), consumer reads {mode}: median us "
                          f"[{placement}]", ["system"] + size_hdr, rows)
            for ref in fastshm_systems:
                ratio_rows: List[List[str]] = []
                for s in rows_sys + [f"limit-{t}" for t in limit_rows]:
                    if s == ref:
                        continue
                    cells = []
                    for z in sizes:
                        a = idx.get(("latency", mode, placement, ref, z))
                        if s.startswith("limit-"):
                            v = _limit(idx, placement, s[len("limit-"):], z)
                        else:
                            b = idx.get(("latency", mode, placement, s, z))
                            v = b.one_way if b else None
                        cells.append(_fmt_ratio(v / a.one_way) if a and v else "-")
                    if any(c != "-" for c in cells):
                        ratio_rows.append([s] + cells)
                out += _table(f"  {ref} speed-up over each (baseline time / {ref} time; "
                              f">1 = {ref} faster)", ["  vs"] + size_hdr,
                              [["  " + r[0]] + r[1:] for r in ratio_rows])
        rows_sys = [s for s in _order(results)
                    if any(r.kind == "stream" and r.placement == placement and r.system == s
                           for r in results)]
        if rows_sys:
            rows = []
            for s in rows_sys:
                cells = []
                for z in sizes:
                    r = idx.get(("stream", "touch", placement, s, z))
                    cells.append(f"{_fmt_rate(r.msgs_per_s)}/{r.gb_per_s:.2f}" if r else "-")
                rows.append([s] + cells)
            memcpy_row = ["memcpy (limit)"] + [
                f"{_fmt_rate(m.msgs_per_s)}/{m.gb_per_s:.2f}" if (m := _memcpy(idx, z)) else "-"
                for z in sizes]
            if any(c != "-" for c in memcpy_row[1:]):
                rows.append(memcpy_row)
            out += _table(f"Streaming, consumer touches each: median messages/s / GB/s "
                          f"[{placement}]", ["system"] + size_hdr, rows)
            for ref in fastshm_systems:
                ratio_rows = []
                for s in rows_sys:
                    if s == ref:
                        continue
                    cells = []
                    for z in sizes:
                        a = idx.get(("stream", "touch", placement, ref, z))
                        b = idx.get(("stream", "touch", placement, s, z))
                        cells.append(_fmt_ratio(a.msgs_per_s / b.msgs_per_s) if a and b else "-")
                    ratio_rows.append([s] + cells)
                if ratio_rows:
                    out += _table(f"  {ref} rate over each (>1 = {ref} faster)",
                                  ["  vs"] + size_hdr,
                                  [["  " + r[0]] + r[1:] for r in ratio_rows])
    target_lines = targets(results)
    if target_lines:
        out.append("Targets (benchmark issue):")
        out += ["  " + t for t in target_lines]
    return "\n".join(out).rstrip() + "\n"


def targets(results: List[Result]) -> List[str]:
    """The benchmark issue's targets, each with MET or MISSED and the measured ratio."""
    idx = _index(results)
    lines: List[str] = []
    placements = [p for p in ("cross", "same", "none") if any(r.placement == p for r in results)]
    frame = FRAME_1080P
    memcpy = _memcpy(idx, frame)

    def verdict(ok: bool) -> str:
        return "MET   " if ok else "MISSED"

    for p in placements:
        for transport in ("tcp", "unix"):
            fs = f"fastshm-{transport}"
            lat = idx.get(("latency", "touch", p, fs, frame))
            hop = idx.get(("latency", "touch", p, f"bare-{transport}", 64))
            if lat and hop and memcpy:
                # round trips: fastshm's against one copy plus a bare 64-byte round trip
                limit = memcpy.median + hop.median
                ratio = lat.median / limit
                lines.append(f"{verdict(ratio <= 1.15)} [{p}] 6.2 MB round trip {fs} "
                             f"{_fmt_time(lat.median)} us = {ratio:.2f}x (memcpy "
                             f"{_fmt_time(memcpy.median)} + bare 64 B {transport} round trip "
                             f"{_fmt_time(hop.median)} us); target <= 1.15x")
            raw = idx.get(("latency", "touch", p, transport, frame))
            if lat and raw:
                # the 10x target is against TCP; Unix is shown for information
                ratio = raw.one_way / lat.one_way
                head = verdict(ratio >= 10) if transport == "tcp" else "(info)"
                goal = "; target >= 10x" if transport == "tcp" else ""
                lines.append(f"{head} [{p}] 6.2 MB latency {fs} is {ratio:.1f}x "
                             f"faster than a raw {transport} socket{goal}")
            small = idx.get(("latency", "touch", p, fs, 64))
            raw_small = idx.get(("latency", "touch", p, transport, 64))
            if small and raw_small:
                ratio = small.one_way / raw_small.one_way
                lines.append(f"{verdict(ratio <= 1.0)} [{p}] 64 B latency {fs} "
                             f"{_fmt_time(small.one_way)} us = {ratio:.2f}x the raw {transport} "
                             f"socket's {_fmt_time(raw_small.one_way)} us; target <= 1x")
            st = idx.get(("stream", "touch", p, fs, frame))
            others = [r for (k, _m, pp, s, z), r in idx.items()
                      if k == "stream" and pp == p and z == frame and r.role == "baseline"]
            if st and others:
                best = max(others, key=lambda r: r.msgs_per_s)
                ratio = st.msgs_per_s / best.msgs_per_s
                lines.append(f"{verdict(ratio >= 1.0)} [{p}] 6.2 MB streaming {fs} "
                             f"{st.msgs_per_s:.0f} frames/s = {ratio:.2f}x the best baseline "
                             f"({best.system}, {best.msgs_per_s:.0f}/s); target >= 1x")
            st64 = idx.get(("stream", "touch", p, fs, 64))
            if st64:
                lines.append(f"{verdict(st64.msgs_per_s >= 500_000)} [{p}] 64 B streaming {fs} "
                             f"{st64.msgs_per_s:,.0f} messages/s; target >= 500,000")
    return lines


# ------------------------------------------------------------------ chart
def chart(results: List[Result], path: str) -> Optional[str]:
    """Write the PNG chart; return its path, or None when matplotlib is not installed."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    idx = _index(results)
    placements = [p for p in ("cross", "same", "none") if any(r.placement == p for r in results)]
    if not placements:
        return None
    systems = _order(results)
    sizes = sorted({r.size for r in results})
    memcpy = {z: m for z in sizes if (m := _memcpy(idx, z)) is not None}
    fig, axes = plt.subplots(len(placements), 3, figsize=(18, 5.2 * len(placements)),
                             squeeze=False)
    styles: Dict[str, Dict[str, Any]] = {}
    cmap = plt.get_cmap("tab10")
    for i, s in enumerate(systems + ["memcpy"]):
        role = "limit" if s == "memcpy" else next(r.role for r in results if r.system == s)
        styles[s] = dict(color="black" if s == "memcpy" else cmap(i % 10),
                         linewidth=3.0 if role == "fastshm" else 1.4,
                         linestyle="--" if role == "limit" else "-",
                         marker="o" if role == "fastshm" else "X" if s in LIMITS else ".",
                         markersize=9 if s in LIMITS else 6, label=s)
    for row, p in enumerate(placements):
        ax_lat, ax_thr, ax_over = axes[row]
        for s in systems:
            pts = [(z, idx[("latency", "touch", p, s, z)].one_way * 1e6) for z in sizes
                   if ("latency", "touch", p, s, z) in idx]
            if pts:
                ax_lat.plot(*zip(*pts), **styles[s])
            pts = [(z, idx[("stream", "touch", p, s, z)].gb_per_s) for z in sizes
                   if ("stream", "touch", p, s, z) in idx]
            if pts:
                ax_thr.plot(*zip(*pts), **styles[s])
            # a loan copies nothing: its whole round trip is the cost beyond a copy
            pts = [(z, (idx[("latency", "touch", p, s, z)].median
                        - (0.0 if "loan" in s else memcpy[z].median)) * 1e6)
                   for z in sizes if ("latency", "touch", p, s, z) in idx and z in memcpy]
            pts = [(z, v) for z, v in pts if v > 0]
            if pts and s not in LIMITS:
                ax_over.plot(*zip(*pts), **styles[s])
        for t, ls in (("tcp", "--"), ("unix", ":")):
            pts = [(z, v * 1e6) for z in sizes if (v := _limit(idx, p, t, z)) is not None]
            if pts:
                ax_lat.plot(*zip(*pts), color="black", linestyle=ls, linewidth=1.4,
                            label=f"limit-{t}: (memcpy + bare RTT)/2")
        if memcpy:
            zs = sorted(memcpy)
            ax_thr.plot(zs, [memcpy[z].gb_per_s for z in zs], **styles["memcpy"])
        ax_lat.set_title(f"one-way latency (RTT/2), consumer touches [{p}]")
        ax_lat.set_ylabel("microseconds (lower is better)")
        ax_thr.set_title(f"streaming throughput [{p}]")
        ax_thr.set_ylabel("GB/s (higher is better)")
        ax_over.set_title(f"round trip minus one memcpy of the payload (loan: all) [{p}]")
        ax_over.set_ylabel("microseconds per message beyond the copy")
        for ax in (ax_lat, ax_thr, ax_over):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("payload size (bytes)")
            ax.set_xticks(sizes)
            ax.set_xticklabels([size_label(z) for z in sizes], rotation=30, fontsize=8)
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
        ax_lat.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``bench`` subcommand."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="about a minute: 64 B, 64 KiB and 6.2 MB, cross-core, touch and streaming")
    g.add_argument("--smoke", action="store_true",
                   help="seconds: prove every benchmark runs (timings meaningless)")
    g.add_argument("--from-json", metavar="FILE",
                   help="report a pytest-benchmark JSON file of the suite instead of running it")
    parser.add_argument("--out", metavar="DIR", default=".benchmarks",
                        help="where the JSON, the log and the chart go (default: .benchmarks)")
    parser.add_argument("--png", metavar="FILE",
                        help="the chart's path (default: DIR/fastshm-bench.png)")
    parser.add_argument("--bench-dir", metavar="DIR", help="the suite (default: ./bench)")
    parser.add_argument("pytest_args", nargs="*", metavar="PYTEST_ARG",
                        help="more pytest options, after --, e.g. -- --bench-sizes 64,4096")


def run(args: argparse.Namespace) -> int:
    """Run (or read) the suite, print the report, write the chart."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    if args.from_json:
        json_path = Path(args.from_json)
    else:
        profile = "quick" if args.quick else "smoke" if args.smoke else "full"
        json_path = out / "fastshm-bench.json"
        if json_path.exists():
            json_path.unlink()
        status = run_suite(find_bench_dir(args.bench_dir), json_path.resolve(), profile,
                           list(args.pytest_args), out / "fastshm-bench.log")
        if not json_path.exists():
            print("fastshm bench: the suite wrote no results", file=sys.stderr)
            return status or 1
    results, machine = load(str(json_path))
    if not results:
        print(f"fastshm bench: no results in {json_path}", file=sys.stderr)
        return status or 1
    sys.stdout.write(report(results, machine))
    png = chart(results, args.png or str(out / "fastshm-bench.png"))
    print(f"\nresults: {json_path}")
    print(f"chart: {png}" if png else "chart: skipped (pip install matplotlib)")
    return status


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastshm bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
