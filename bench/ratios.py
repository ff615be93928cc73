"""The ratio table: each contender's median time per optimizer step against its group's baseline.

Shared by the terminal summary of `pytest bench/` (bench/conftest.py) and by bench/plot.py, which
reads a run saved with ``--benchmark-autosave`` or ``--benchmark-json``. Everything here works on
plain records, so a saved run and a live one give the same table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Record:
    """One benchmark's result, as the table needs it."""

    group: str  # "<group>:<job>:<device>", for example "loop-overhead:tutorial:cpu"
    contender: str
    seconds_per_step: float  # median time of a round divided by the optimizer steps in it
    baseline: bool  # the contender the whole group is compared with (the hand-written loop)
    reference: str | None  # a second contender to compare with (the same optimizer, say)
    hook_calls_per_step: int  # extra hook calls per step over `reference` (the no-op plugins)
    samples_per_step: int = 0  # the inference group: the batch size of a forward pass
    p99_seconds_per_step: float | None = None

    @classmethod
    def from_benchmark(cls, group: str, median: float, extra_info: Mapping[str, Any]) -> Record:
        p99 = extra_info.get("p99_us_per_step")
        return cls(
            group=group,
            contender=extra_info["contender"],
            seconds_per_step=median / extra_info["steps_per_round"],
            baseline=bool(extra_info.get("baseline")),
            reference=extra_info.get("reference"),
            hook_calls_per_step=int(extra_info.get("hook_calls_per_step", 0)),
            samples_per_step=int(extra_info.get("samples_per_step", 0)),
            p99_seconds_per_step=p99 / 1e6 if p99 is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Row:
    group: str
    contender: str
    us_per_step: float
    ratio: float | None  # to the group's baseline; None when the baseline did not run
    reference: str | None
    ratio_to_reference: float | None
    us_per_hook_call: float | None


def load_saved(path: str | Path) -> list[Record]:
    """The records of a run saved by pytest-benchmark (autosave or ``--benchmark-json``)."""
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        Record.from_benchmark(item["group"], item["stats"]["median"], item["extra_info"])
        for item in saved["benchmarks"]
        if "contender" in item.get("extra_info", {})
    ]


def rows(records: Iterable[Record]) -> list[Row]:
    """One row per record, grouped in the order groups first appear."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    table = []
    for group, members in groups.items():
        by_name = {record.contender: record for record in members}
        baseline = next((record for record in members if record.baseline), None)
        for record in members:
            reference = by_name.get(record.reference or "")
            difference = record.seconds_per_step - reference.seconds_per_step if reference else 0.0
            table.append(
                Row(
                    group=group,
                    contender=record.contender,
                    us_per_step=record.seconds_per_step * 1e6,
                    ratio=record.seconds_per_step / baseline.seconds_per_step if baseline else None,
                    reference=record.reference,
                    ratio_to_reference=record.seconds_per_step / reference.seconds_per_step if reference else None,
                    us_per_hook_call=(
                        difference * 1e6 / record.hook_calls_per_step
                        if reference and record.hook_calls_per_step
                        else None
                    ),
                )
            )
    return table


def format_table(table: list[Row]) -> str:
    """The table as text, in markdown so that it pastes into bench/RESULTS.md unchanged."""
    lines = [
        "| group | contender | µs/step | vs baseline | vs reference (which) |",
        "|---|---|---:|---:|---|",
    ]
    previous = None
    for row in table:
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "n/a"
        against = ""
        if row.ratio_to_reference is not None:
            against = f"{row.ratio_to_reference:.3f} ({row.reference})"
            if row.us_per_hook_call is not None:
                against += f"; {row.us_per_hook_call:.2f} µs per hook call"
        group = row.group if row.group != previous else ""
        previous = row.group
        lines.append(f"| {group} | {row.contender} | {row.us_per_step:.1f} | {ratio} | {against} |")
    return "\n".join(lines)


def latency_table(records: Iterable[Record]) -> str:
    """The inference records (those with a batch size) as latency per batch, median and p99,
    samples per second and the speed-up over the group's baseline (eager); empty if none."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        if record.samples_per_step:
            groups.setdefault(record.group, []).append(record)
    timed = [record for members in groups.values() for record in members]  # grouped, in first-seen order
    if not timed:
        return ""
    baselines = {record.group: record for record in timed if record.baseline}
    lines = [
        "| group | contender | median µs | p99 µs | samples/s | speed-up vs eager |",
        "|---|---|---:|---:|---:|---:|",
    ]
    previous = None
    for record in timed:
        baseline = baselines.get(record.group)
        speed_up = f"{baseline.seconds_per_step / record.seconds_per_step:.2f}x" if baseline else "n/a"
        p99 = f"{record.p99_seconds_per_step * 1e6:.1f}" if record.p99_seconds_per_step is not None else "n/a"
        group = record.group if record.group != previous else ""
        previous = record.group
        lines.append(
            f"| {group} | {record.contender} | {record.seconds_per_step * 1e6:.1f} | {p99} | "
            f"{record.samples_per_step / record.seconds_per_step:,.0f} | {speed_up} |"
        )
    return "\n".join(lines)
