#!/usr/bin/env python3
"""Draws the ratios of `cargo bench --bench vm_fio` (target/bench/vm_fio.json) as a PNG: one bar
per row, p2pnvmf / kernel, RDMA and TCP side by side; 1.0 is parity. Latency and CPU rows are
inverted (kernel / ours) so that longer bars are better everywhere."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src) as f:
        report = json.load(f)
    labels, series = [], {"rdma": [], "tcp": []}
    for row in report["rows"]:
        ratio = row["ratio"] if row["higher_is_better"] else 1 / row["ratio"]
        series[row["transport"]].append(ratio)
        if row["transport"] == "rdma":
            what = row["metric"] if row["higher_is_better"] else row["metric"] + " (kernel/ours)"
            labels.append(f'{row["backing"]} {row["job"]} {what}')
    n = len(labels)
    fig, ax = plt.subplots(figsize=(10, 0.32 * n + 1.5))
    ys = range(n)
    h = 0.4
    ax.barh([y - h / 2 for y in ys], series["rdma"], h, label="RDMA (rxe)", color="#3a6ea5")
    ax.barh([y + h / 2 for y in ys], series["tcp"], h, label="TCP", color="#e08a2c")
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
