"""A resume continues the same run, or is refused.

Every checkpoint records the run's course (`course`): its resolved config, the sizes of what it
trained on, and the changes earlier resumes made. ``--resume`` compares what it would continue
with against that record: the config before anything is built (`check_config`), the data once it
is read (`check_data`). A change to a setting that does not declare itself `engine.Changeable`
(how long the run is, what it logs, when it checkpoints) is a ConfigError naming each changed key
with its old and new values, unless the user allows it (``--allow-change KEY``, a key or a whole
section). Every change is kept in `trainer.changes`, which summary.json and the next checkpoints
record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .config import changeable
from .errors import ConfigError, suggest

# The sizes a run trained on, recorded beside its config: a data file whose contents changed under
# the same settings changes these.
SIZES = ("n_train", "n_val", "n_test", "batches_per_epoch")


def course(trainer: Any) -> dict[str, Any]:
    """What a checkpoint records of the run's course (plain values: it loads with weights_only)."""
    info = trainer.info
    sizes = {"n_train": info.n_train, "n_val": info.n_val, "n_test": info.n_test}
    sizes["batches_per_epoch"] = trainer.batches_per_epoch
    return {"config": flat(trainer.config), "sizes": sizes, "changes": [dict(change) for change in trainer.changes]}


def flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as ``{"section.key": value}``, tuples as lists (as a checkpoint gives them back)."""
    found: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            found.update({f"{key}.{name}": _plain(item) for name, item in value.items()})
        else:
            found[key] = _plain(value)
    return found


def _plain(value: Any) -> Any:
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def recorded(saved: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The course a checkpoint records, or a ConfigError naming the file."""
    found = saved.get("course")
    if not isinstance(found, Mapping) or not {"config", "sizes", "changes"} <= set(found):
        raise ConfigError(f"checkpoint '{source}' records no course of its run to continue")
    return dict(found)


def check_config(trainer: Any, saved: Mapping[str, Any], source: Path) -> list[str]:
    """The config a resume continues with against the one the run was trained with (all but
    [inferred], which the data fills in: `check_data`); the keys the user allowed to change."""
    old = {key: value for key, value in recorded(saved, source)["config"].items() if not key.startswith("inferred.")}
    new = {key: value for key, value in flat(trainer.config).items() if not key.startswith("inferred.")}
    check_allowed(trainer.allowed_changes, [*new, *old, *(f"inferred.{size}" for size in SIZES)])
    trainer.changes = [*recorded(saved, source)["changes"]]
    return judge(trainer, saved, source, differences(old, new), changeable(trainer.config, trainer.plugins))


def check_data(trainer: Any, saved: Mapping[str, Any], source: Path, allowed: list[str]) -> None:
    """What the data tells (its task and sizes, [inferred]) against what the run trained on. An
    allowed change of the [data] section (its batch size, its samples) explains these."""
    found = recorded(saved, source)
    old = {key: value for key, value in found["config"].items() if key.startswith("inferred.")}
    old.update({f"inferred.{size}": value for size, value in found["sizes"].items()})
    new = {key: value for key, value in flat(trainer.config).items() if key.startswith("inferred.")}
    new.update({f"inferred.{size}": value for size, value in course(trainer)["sizes"].items()})
    explained = set(new) if any(key.startswith("data.") for key in allowed) else set()
    judge(trainer, saved, source, differences(old, new), explained)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) of every key that differs. Where a section's component changed (its
    ``name``), its other keys that only one of them has belong to the component, not the change."""
    renamed = {key.rpartition(".")[0] for key in new if key.endswith(".name") and old.get(key, new[key]) != new[key]}
    found = []
    for key in dict.fromkeys([*old, *new]):
        if key.rpartition(".")[0] in renamed and (key not in old or key not in new):
            continue
        if old.get(key, MISSING) != new.get(key, MISSING):
            found.append((key, old.get(key, MISSING), new.get(key, MISSING)))
    return found


def judge(
    trainer: Any, saved: Mapping[str, Any], source: Path, found: list[tuple[str, Any, Any]], free: set[str]
) -> list[str]:
    """Refuse the changes neither `free` nor allowed by the user; record the others. The keys the
    user allowed."""
    allowed, overridden = set(trainer.allowed_changes), []
    refused = []
    for key, old, new in found:
        section = key.rpartition(".")[0]
        override = key not in free
        if override and not ({key, section, f"{section}.name"} & allowed):
            refused.append(f"{key} {_shown(old)} -> {_shown(new)}")
            continue
        change = {"key": key, "from": _stored(old), "to": _stored(new), "step": saved["state"]["step"]}
        trainer.changes.append({**change, "override": override})
        overridden += [key] if override else []
    if refused:
        run = source.parent.parent
        raise ConfigError(
            f"--resume: run '{run}' was trained with other settings: {', '.join(refused)}; a resume continues the "
            "same run (allow a change with --allow-change KEY, recorded in its summary, or start a new run)"
        )
    return overridden


def check_allowed(allowed: Iterable[str], keys: Iterable[str]) -> None:
    """Each ``--allow-change`` names a key or a section of the run's config."""
    known = set(keys) | {key.rpartition(".")[0] for key in keys}
    for key in allowed:
        if key not in known:
            raise ConfigError(f"--allow-change: {key!r} is no setting or section of the run{suggest(key, known)}")


def continue_position(trainer: Any, saved: Mapping[str, Any]) -> None:
    """A resumed run whose epochs have another number of batches (an allowed change of the batch
    size) starts its interrupted epoch again: a position in the old batches is none in the new,
    and no sample of the epoch may be skipped."""
    if saved["course"]["sizes"]["batches_per_epoch"] != trainer.batches_per_epoch:
        trainer.state.batch = 0


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


MISSING = _Missing()


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _stored(value: Any) -> Any:
    return None if value is MISSING else value
