#!/usr/bin/env python3
"""Draws the ratios of `cargo bench --bench vm_fio` (target/bench/vm_fio.json) as a PNG: per row,
p2pnvmf / kernel over RDMA and TCP, each in the default mode and in poll mode; 1.0 is parity. Latency and CPU rows are
inverted (kernel / ours) so that longer bars are better everywhere."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src) as f:
        report = json.load(f)
    labels = []
    series = {(t, mode): [] for t in ("rdma", "tcp") for mode in ("ratio", "poll_ratio")}
    for row in report["rows"]:
        for mode in ("ratio", "poll_ratio"):
            r = row.get(mode)
            series[(row["transport"], mode)].append(0 if not r else r if row["higher_is_better"] else 1 / r)
        if row["transport"] == "rdma":
            what = row["metric"] if row["higher_is_better"] else row["metric"] + " (kernel/ours)"
            labels.append(f'{row["backing"]} {row["job"]} {what}')
    n = len(labels)
    fig, ax = plt.subplots(figsize=(10, 0.45 * n + 1.5))
    ys = range(n)
    h = 0.2
    bars = [
        (("rdma", "ratio"), "RDMA (rxe)", "#3a6ea5", None),
        (("rdma", "poll_ratio"), "RDMA, poll mode", "#3a6ea5", "//"),
        (("tcp", "ratio"), "TCP", "#e08a2c", None),
        (("tcp", "poll_ratio"), "TCP, poll mode", "#e08a2c", "//"),
    ]
    for i, (key, label, color, hatch) in enumerate(bars):
        ax.barh([y + (i - 1.5) * h for y in ys], series[key], h, label=label, color=color, hatch=hatch,
                alpha=0.6 if hatch else 1.0)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("p2pnvmf / kernel nvmet (higher is better)")
    ax.set_title(f'p2pnvmf beside the kernel target, {report["date"]} ({report["command"]})', fontsize=9)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
