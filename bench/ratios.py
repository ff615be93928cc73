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

    @classmethod
    def from_benchmark(cls, group: str, median: float, extra_info: Mapping[str, Any]) -> Record:
        return cls(
            group=group,
            contender=extra_info["contender"],
            seconds_per_step=median / extra_info["steps_per_round"],
            baseline=bool(extra_info.get("baseline")),
            reference=extra_info.get("reference"),
            hook_calls_per_step=int(extra_info.get("hook_calls_per_step", 0)),
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
