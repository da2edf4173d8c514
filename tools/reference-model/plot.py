#!/usr/bin/env python3
"""Training curves of the reference model: loss and per-task batch answer accuracy vs tokens seen.

    python3 plot.py --out curves.png train_a.csv train_b.csv
"""
import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csvs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for p in args.csvs:
        with open(p) as fh:
            rows += list(csv.DictReader(fh))
    tok = [int(r["tokens"]) / 1e6 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, dpi=80)
    ax1.plot(tok, [float(r["lm_loss"]) for r in rows], lw=0.8, label="LM loss (natural text)")
    ax1.plot(tok, [float(r["loss"]) for r in rows], lw=0.8, alpha=0.6, label="weighted loss")
    ax1.set_ylabel("loss (nats)")
    ax1.set_yscale("log")
    ax1.legend(loc="lower left", fontsize=8)
    ax1.grid(alpha=0.3)
    # Context-length segments (shaded alternately, labelled) and the boundary between phases.
    segs = []
    for t, r in zip(tok, rows):
        if not segs or segs[-1][2] != r["context"]:
            segs.append([t, t, r["context"]])
        segs[-1][1] = t
    top = max(float(r["lm_loss"]) for r in rows)
    for i, (a, b, L) in enumerate(segs):
        end = segs[i + 1][0] if i + 1 < len(segs) else b
        ax1.axvspan(a, end, color="gray", alpha=0.12 if i % 2 == 0 else 0.04, lw=0)
        ax1.text((a + end) / 2, top, f"{int(L) // 1024}K ctx", ha="center", va="top", fontsize=7)
    if len(args.csvs) > 1:
        with open(args.csvs[0]) as fh:
            n_a = sum(1 for _ in fh) - 1
        for ax in (ax1, ax2):
            ax.axvline(tok[n_a - 1], color="k", lw=0.8, ls="--")
        ax2.text(tok[n_a - 1], 0.05, " phase B (resumed)", fontsize=7)
    for task in ("passkey", "multikey", "vartrack", "ar"):
        xs, ys, acc = [], [], []
        for t, r in zip(tok, rows):
            v = r.get(f"acc_{task}", "")
            if v != "":
                acc.append(float(v))
                xs.append(t)
                k = min(len(acc), 10)
                ys.append(sum(acc[-k:]) / k)
        ax2.plot(xs, ys, lw=1.0, label=task)
    ax2.set_ylabel("answer exact match\n(training batch, moving avg)")
    ax2.set_xlabel("tokens seen (M)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle("recall-tiny training curves", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
