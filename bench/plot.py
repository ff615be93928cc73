"""Draw the ratio table of a saved benchmark run as a PNG bar chart, one panel per group.

    python bench/plot.py                              # the newest run under .benchmarks/
    python bench/plot.py .benchmarks/<machine>/0001_<commit>.json -o ratios.png

A run is saved by ``pytest bench/ --benchmark-autosave`` (or ``--benchmark-json=FILE``). Needs
matplotlib: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ratios import Row, load_saved, rows


def newest_saved(root: Path) -> Path:
    saved = sorted(root.glob("*/*.json"), key=lambda path: path.stat().st_mtime)
    if not saved:
        raise SystemExit(f"no saved run under {root}/: run `pytest bench/ --benchmark-autosave` first")
    return saved[-1]


def draw(table: list[Row], title: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none wanted on CI
    import matplotlib.pyplot as plt

    groups: dict[str, list[Row]] = {}
    for row in table:
        if row.ratio is not None:
            groups.setdefault(row.group, []).append(row)
    if not groups:
        raise SystemExit("the run has no group with a baseline to take ratios to")
    heights = [0.4 * len(members) + 0.8 for members in groups.values()]
    figure, axes = plt.subplots(
        len(groups), 1, figsize=(8, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for axis, (group, members) in zip(axes[:, 0], groups.items()):
        names = [row.contender for row in members][::-1]
        ratios = [row.ratio for row in members][::-1]
        # Faster than the baseline in one colour, slower in another: the chart is read at a glance.
        colours = ["tab:green" if ratio <= 1 else "tab:red" for ratio in ratios]
        bars = axis.barh(names, ratios, color=colours)
        axis.axvline(1.0, color="black", linewidth=0.8)
        for bar, row in zip(bars, members[::-1]):
            axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row.ratio:.2f}", va="center", fontsize=8)
        axis.set_title(group, fontsize=10, loc="left")
        axis.set_xlim(0, max(ratios) * 1.15)
        axis.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("median time per optimizer step ÷ the group's baseline (lower is faster)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(output, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved", nargs="?", type=Path, help="a saved run (default: the newest under .benchmarks/)")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench-ratios.png"))
    arguments = parser.parse_args(argv)
    saved = arguments.saved or newest_saved(Path(".benchmarks"))
    draw(rows(load_saved(saved)), f"engine benchmark ratios: {saved.name}", arguments.output)
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
