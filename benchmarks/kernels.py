"""Kernel benchmark (BENCH.md): bitllm I2/T1/B1 A8 kernels vs torch fp32 / bf16 / torch._int_mm.

GEMV (M=1) and GEMM (M=128) on the BitNet b1.58 700M and 3B linear shapes, at 1 and 2 threads,
cycling through >= 4x L3 of weight copies so that GEMV weights stream from DRAM. Every row prints
median and min of >= 5 reps, effective GB/s (bytes of the format's packed weights / time), % of
the read roofline measured in the same run (and of a local roofline taken just before and after
that row: the machine is shared), and speed-up ratios (baseline time / bitllm time).
T1 and B1 rows also print their time per weight relative to I2 (targets: <= 0.85 and <= 0.6).

    .venv/bin/python benchmarks/kernels.py [--threads 1,2] [--reps 7] [--quick]
    .venv/bin/python benchmarks/kernels.py --hot   # compute ceilings: cache-resident, M = 1, 4, 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bar_chart,
    fmt_table,
    l3_bytes,
    loadavg,
    machine_line,
    n_copies,
    roofline_gbs,
    time_cycled,
    write_results,
)

from bitllm import _core  # noqa: E402
from bitllm import kernels as bk  # noqa: E402

SHAPES = [(1536, 1536), (4096, 1536), (1536, 4096), (8640, 3200), (3200, 8640)]  # (N, K)
FORMATS = ["i2", "t1", "b1"]


def random_weights(fmt: str, N: int, K: int) -> torch.Tensor:
    if fmt == "b1":
        return (torch.randint(0, 2, (N, K)) * 2 - 1).to(torch.int8)
    return torch.randint(-1, 2, (N, K)).to(torch.int8)


def copies_of(t: torch.Tensor, total: int) -> list[torch.Tensor]:
    return [t] + [t.clone() for _ in range(n_copies(t.numel() * t.element_size(), total) - 1)]


def bench_shape(M: int, N: int, K: int, reps: int, total: int, baselines: bool) -> list[dict]:
    x = torch.randn(M, K)
    rows: list[dict] = []
    base: dict[str, float] = {}
    if baselines:
        W32 = torch.randn(N, K)
        for name, W, fn in [
            ("torch fp32", W32, lambda W: (lambda: x @ W.T)),
            ("torch bf16", W32.bfloat16(), None),
            ("torch _int_mm", W32.sign().to(torch.int8), None),
        ]:
            ws = copies_of(W, total if M == 1 else W.numel() * W.element_size())
            if name == "torch bf16":
                xb = x.bfloat16()
                calls = [(lambda W=W: xb @ W.T) for W in ws]
            elif name == "torch _int_mm":
                q = torch.randint(-127, 128, (M, K), dtype=torch.int8)
                calls = [(lambda W=W: torch._int_mm(q, W.T)) for W in ws]  # W.T: (K, N) column-major view
            else:
                calls = [fn(W) for W in ws]
            t = time_cycled(calls, reps=reps if M == 1 else max(5, reps // 2), min_batch_s=0.02 if M == 1 else 0.0)
            nbytes = W.numel() * W.element_size()
            base[name] = t.median_s
            rows.append({"impl": name, "M": M, "N": N, "K": K, "bytes": nbytes, **t.as_dict()})
    for fmt in FORMATS:
        p = bk.pack(fmt, random_weights(fmt, N, K))
        datas = copies_of(p.data, total if M == 1 else p.data.numel())
        ws, out = torch.ones(N), torch.empty(M, N)
        code = ["i2", "t1", "b1"].index(fmt)
        # quantize + A8 kernel through the raw-pointer entry (what bitllm.kernels.linear_a8 runs)
        calls = [(lambda d=d.data_ptr(): _core.linear_ptr(True, code, d, N, K, x.data_ptr(), M, ws.data_ptr(), 0,
                                                          out.data_ptr(), -1)) for d in datas]
        # A local roofline taken right before and after the row (best of both): on a shared,
        # noisy machine the run-level roofline can be minutes away from this row's conditions.
        local = roofline_gbs(bk.get_num_threads(), 256 << 20, 3)
        t = time_cycled(calls, reps=reps)
        local = max(local, roofline_gbs(bk.get_num_threads(), 256 << 20, 3))
        rows.append({"impl": f"bitllm {fmt}", "M": M, "N": N, "K": K, "bytes": p.data.numel(),
                     "bits_per_weight": p.bits_per_weight, **t.as_dict(), "local_roofline_gbs": local,
                     **{f"x_vs_{k}": v / t.median_s for k, v in base.items()}})
    return rows


def hot_table(threads: int, reps: int) -> list[dict]:
    """Compute ceilings: one copy of each matrix (cache-resident, so no DRAM in the way), A8 kernels at
    M = 1, 4 and 16 activation rows, in G weight-rows/s (M·N·K / time). GEMV speed here against the
    DRAM roofline says whether a format can be memory-bound; M = 16 against M = 1 bounds what batching
    concurrent streams can gain (issue 10)."""
    from bitllm import _core

    rows = []
    for N, K in SHAPES[1:3]:
        for fmt in FORMATS:
            p = bk.pack(fmt, random_weights(fmt, N, K))
            code, ws = FORMATS.index(fmt), torch.ones(N)
            for M in (1, 4, 16):
                x, out = torch.randn(M, K), torch.empty(M, N)
                t = time_cycled([lambda: _core.linear_ptr(True, code, p.data.data_ptr(), N, K, x.data_ptr(), M,
                                                          ws.data_ptr(), 0, out.data_ptr(), -1)], reps=reps,
                                min_batch_s=0.02)
                rows.append({"impl": f"bitllm {fmt}", "M": M, "N": N, "K": K, "threads": threads,
                             "gwr_s": M * N * K / t.median_s / 1e9, **t.as_dict()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--gemm-m", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="GEMV only, no torch baselines")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--hot", action="store_true",
                    help="only the compute ceilings: cache-resident matrices at M = 1, 4, 16 (G weight-rows/s)")
    args = ap.parse_args()
    total = max(4 * l3_bytes(), 128 << 20)
    isa = bk.active_isa()
    results = {"isa": isa, "cpu": bk.cpu_model(), "runs": []}
    print(f"# bitllm kernels benchmark — weights cycled over >= {total >> 20} MiB per set; load avg before: {loadavg()}")
    if args.hot:
        for threads in [int(t) for t in args.threads.split(",")]:
            bk.set_num_threads(threads)
            rows = hot_table(threads, args.reps)
            results["runs"] += rows
            print(f"\n## cache-resident A8 kernels, {threads} thread(s) — {machine_line(isa, threads)}")
            print(fmt_table(["N x K", "impl", "M", "median us", "G weight-rows/s", "vs M=1"],
                            [[f"{r['N']}x{r['K']}", r["impl"], r["M"], f"{r['median_us']:.1f}", f"{r['gwr_s']:.1f}",
                              f"{r['gwr_s'] / next(q['gwr_s'] for q in rows if q['impl'] == r['impl'] and q['N'] == r['N'] and q['M'] == 1):.2f}x"]
                             for r in rows]))
        print(f"\nload avg after: {loadavg()}")
        print(f"wrote {write_results('kernels_hot', results)}")
        return
    for threads in [int(t) for t in args.threads.split(",")]:
        bk.set_num_threads(threads)
        torch.set_num_threads(threads)
        roof = roofline_gbs(threads)
        print("\n" + machine_line(isa, threads, roof))
        modes = [("GEMV", 1)] + ([] if (args.quick or args.no_gemm) else [("GEMM", args.gemm_m)])
        for mode, M in modes:
            table, i2_time = [], {}
            for N, K in SHAPES:
                for r in bench_shape(M, N, K, args.reps, total, baselines=not args.quick):
                    gbs = r["bytes"] / r["median_us"] / 1e3
                    r.update(threads=threads, mode=mode, gbs=gbs, pct_roofline=100 * gbs / roof, roofline_gbs=roof)
                    if "local_roofline_gbs" in r:
                        r["pct_local_roofline"] = 100 * gbs / r["local_roofline_gbs"]
                    if r["impl"] == "bitllm i2":
                        i2_time[(N, K)] = r["median_us"]
                    if r["impl"].startswith("bitllm") and (N, K) in i2_time:
                        r["time_per_weight_vs_i2"] = r["median_us"] / i2_time[(N, K)]
                    results["runs"].append(r)
                    table.append([
                        f"{N}x{K}", r["impl"], f"{r['median_us']:.1f}", f"{r['min_us']:.1f}", f"{gbs:.1f}",
                        f"{r['pct_roofline']:.0f}%",
                        f"{r['pct_local_roofline']:.0f}%" if "pct_local_roofline" in r else "",
                        *(f"{r[k]:.2f}" if k in r else "" for k in ("x_vs_torch fp32", "x_vs_torch bf16", "x_vs_torch _int_mm",
                                                                    "time_per_weight_vs_i2")),
                    ])
            print(f"\n## {mode} (M={M}), {threads} thread(s)")
            print(fmt_table(["N x K", "impl", "median us", "min us", "GB/s", "% roof", "% local", "x fp32", "x bf16",
                             "x int_mm", "t/w vs i2"], table))
    print(f"\nload avg after: {loadavg()}")
    path = write_results("kernels", results)
    labels, series = [], {f: [] for f in FORMATS}
    for r in results["runs"]:
        if r["mode"] == "GEMV" and r["impl"] == "bitllm i2":
            labels.append(f"{r['N']}x{r['K']} t{r['threads']}")
        if r["mode"] == "GEMV" and r["impl"].startswith("bitllm"):
            series[r["impl"].split()[1]].append(r["pct_roofline"])
    png = bar_chart("kernels_gemv_roofline", labels, series, "% of measured read roofline",
                    f"bitllm GEMV, {isa}, {bk.cpu_model()}")
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
