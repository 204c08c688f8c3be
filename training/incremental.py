"""A collection that grows: a run started `--from` an earlier run on the set grown since.

`synthd-train train DATA NEW_RUN --from OLD_RUN` starts from the old run's best checkpoint
(weights, their moving average, optimiser state and config) and says what changed in the set,
by content hash: files added, removed and unchanged. What the old run was trained on comes from
its checkpoint (`files`: hash, path and split of every file), because `prepare` updates a set in
place and the old manifest is gone by then.

Refused, with the reason: a model config that differs from the old run's (the weights would not
fit, or would mean something else), preprocessing that differs (sample rate, loudness target,
peak ceiling, conversion or pitch tracker: the old weights learnt other samples), and a set that
holds none of the old run's files (that is a new run, not a grown one).

How the run learns the added files without forgetting the old ones is `[incremental]` of the
config (training.config.IncrementalConfig): every batch replays old files beside the added ones
(`ReplaySchedule`); drawing the added ones more often at first, a scaled learning rate and a
pull toward the old weights (`anchor_step`) are settings, off by default because the benchmark
found no gain in them. Validation is reported apart for the old held-out files and the added
ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.dataset import PreparedFile, PreparedSet

# the preprocessing parameters that decide what samples the model hears; the set gain itself is
# not among them: prepare sets it from the median of the files, so it moves when the set grows.
# Nor is the pitch tracker: no option of prepare chooses it, and training tracks every crop with
# the tracker of the code that trains, so a set tracked by an earlier version still grows a run.
PREPROCESSING_KEYS = ("sample_rate", "target_lufs", "peak_ceiling_dbfs", "channels", "downmix", "resampler",
                      "resample_quality", "dtype", "pipeline_version")
# a run whose old-file validation distance rises more than this above where it started is told
FORGETTING_TOLERANCE = 0.05
LISTED = 8   # files named in the report before "and N more"


class IncrementalError(ValueError):
    """A `--from` run that cannot start; the message says why and what to do instead."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a set as a checkpoint remembers it."""

    content_hash: str
    source: str
    split: str

    @classmethod
    def of(cls, f: "PreparedFile | FileRecord") -> "FileRecord":
        """The record of a `training.dataset.PreparedFile`."""
        return cls(f.content_hash, f.source, f.split)


def file_records(dataset: "PreparedSet") -> list[dict[str, str]]:
    """What a checkpoint keeps of its prepared set's files, so that a later `--from` run can tell
    old files from new ones after `prepare` has replaced the manifest."""
    return [dataclasses.asdict(FileRecord.of(f)) for f in dataset.files]


def old_files(ckpt: dict[str, Any], source: str) -> list[FileRecord]:
    """The files the run of checkpoint `ckpt` (read from `source`) was trained on. A checkpoint
    written before files were recorded is answered from its prepared set while that set is still
    the one it was trained on (same manifest hash); IncrementalError otherwise."""
    if "files" in ckpt:
        return [FileRecord(**f) for f in ckpt["files"]]
    from training.dataset import PreparedSet, PreparedSetError
    data_dir = ckpt.get("dataset_dir")
    try:
        dataset = PreparedSet.open(data_dir) if data_dir else None
    except PreparedSetError:
        dataset = None
    if dataset is None or dataset.manifest_hash != ckpt.get("manifest_hash"):
        raise IncrementalError(f"{source}: the run does not record its files (it predates --from) and its "
                               f"prepared set {data_dir} has changed since, so old and new files cannot be told "
                               "apart; train a new run instead")
    return [FileRecord.of(f) for f in dataset.files]


@dataclass
class SetChange:
    """How a prepared set differs from an old run's files, by content hash."""

    added: list["PreparedFile"]      # in the set, not in the old run
    removed: list[FileRecord]        # in the old run, not in the set
    unchanged: list["PreparedFile"]  # in both

    @classmethod
    def between(cls, old: Iterable[FileRecord], dataset: "PreparedSet") -> "SetChange":
        old = list(old)
        before = {r.content_hash for r in old}
        now = {f.content_hash for f in dataset.files}
        return cls(added=[f for f in dataset.files if f.content_hash not in before],
                   removed=[r for r in old if r.content_hash not in now],
                   unchanged=[f for f in dataset.files if f.content_hash in before])

    def report(self) -> list[str]:
        """Lines for the terminal: counts, then the files added and removed by path."""
        lines = [f"files: {len(self.unchanged)} unchanged, {len(self.added)} added, {len(self.removed)} removed"]
        for word, files in (("added", self.added), ("removed", self.removed)):
            if files:
                names = [f"{f.source} ({f.split})" for f in files[:LISTED]]
                more = f", and {len(files) - LISTED} more" if len(files) > LISTED else ""
                lines.append(f"  {word}: {', '.join(names)}{more}")
        return lines


def check_model(old: dict[str, Any], new: dict[str, Any], old_run: Path) -> None:
    """IncrementalError naming every `model.*` key whose value differs between the two configs
    (plain dicts, training.config.config_to_dict): the old weights fit one shape only."""
    keys = sorted(set(old) | set(new))
    differ = [f"model.{k}: {old.get(k)!r} in {old_run}, {new.get(k)!r} here" for k in keys if old.get(k) != new.get(k)]
    if differ:
        raise IncrementalError(f"--from {old_run}: the model config differs in shape from the old run's "
                               f"({'; '.join(differ)}); a run that continues another keeps its model, so drop "
                               "[model] from --config, or train a new run")


def check_preprocessing(old: dict[str, Any], new: dict[str, Any], old_run: Path, data_dir: str) -> None:
    """IncrementalError naming each preprocessing parameter (PREPROCESSING_KEYS) that differs."""
    differ = [f"{k}: {old.get(k)!r} for {old_run}, {new.get(k)!r} for {data_dir}"
              for k in PREPROCESSING_KEYS if old.get(k) != new.get(k)]
    if differ:
        raise IncrementalError(f"--from {old_run}: the set was prepared differently from the old run's "
                               f"({'; '.join(differ)}); prepare it again with the old run's settings "
                               f"(e.g. --target-lufs {old.get('target_lufs')}), or train a new run")


def check_kept(change: SetChange, old_run: Path, data_dir: str) -> None:
    """IncrementalError when the set keeps none of the old run's files: nothing to grow from."""
    if not change.unchanged:
        raise IncrementalError(f"--from {old_run}: {data_dir} holds none of the old run's "
                               f"{len(change.removed)} files; this is a new run, not a grown one: "
                               "train it without --from")


def lineage(old_run: Path, checkpoint: Path, ckpt: dict[str, Any], change: SetChange) -> dict[str, Any]:
    """What a run started `--from` keeps of its origin (checkpoints and the model file's metadata):
    the old run, its step and data, the files added and removed, and the old run's own lineage."""
    def listing(files: Iterable["PreparedFile | FileRecord"]) -> list[dict[str, str]]:
        return [dataclasses.asdict(FileRecord.of(f)) for f in files]

    return {"from_run": str(old_run.resolve()), "from_checkpoint": checkpoint.name,
            "from_step": int(ckpt.get("step", 0)), "from_manifest_hash": ckpt.get("manifest_hash"),
            "from_data": dict(ckpt.get("data_summary") or {}),
            "added": listing(change.added), "removed": listing(change.removed), "unchanged": len(change.unchanged),
            "previous": ckpt.get("lineage")}


@dataclass
class Origin:
    """The run a `--from` run grows: its best checkpoint, config, and the set's change since."""

    run_dir: Path
    checkpoint: Path
    ckpt: dict[str, Any]
    config: "TrainConfig"
    change: SetChange
    lineage: dict[str, Any]

    @classmethod
    def open(cls, run_dir: Path, dataset: "PreparedSet", data_dir: str) -> "Origin":
        """Read OLD_RUN's best checkpoint and compare its files with `dataset`'s; IncrementalError
        (or FileNotFoundError / ValueError for a folder that is not a run) when it cannot be grown."""
        from training.checkpoint import load_checkpoint, run_checkpoint_path
        from training.config import checkpoint_config

        try:
            path = run_checkpoint_path(run_dir, "best")
        except FileNotFoundError as exc:
            raise IncrementalError(f"--from {run_dir}: {exc}") from None
        ckpt = load_checkpoint(path)
        config = checkpoint_config(ckpt["config"], f"{path} config")
        check_preprocessing(dict(ckpt.get("preprocessing") or {}), dataset.preprocessing, run_dir, data_dir)
        change = SetChange.between(old_files(ckpt, str(path)), dataset)
        check_kept(change, run_dir, data_dir)
        return cls(run_dir, path, ckpt, config, change, lineage(run_dir, path, ckpt, change))

    def load_weights(self, module: nn.Module, key: str) -> None:
        """`module` takes the old run's `key` weights ("model", or "ema" where the run kept an average)."""
        state = self.ckpt.get(key, self.ckpt["model"])
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise IncrementalError(f"--from {self.run_dir}: its weights do not fit this model ({exc})") from None

    def notes(self, dataset: "PreparedSet") -> list[str]:
        """What the user should know about the grown set beyond the counts (warnings)."""
        notes = []
        old_gain = (self.ckpt.get("preprocessing") or {}).get("gain_db")
        moved = dataset.gain_db - float(old_gain) if old_gain is not None else 0.0
        if abs(moved) >= 0.05:  # one gain for the whole set: its median moved with the added files
            notes.append(f"the set gain moved from {float(old_gain):+.2f} dB to {dataset.gain_db:+.2f} dB with the "
                         f"added files: the old files reach the model {abs(moved):.2f} dB "
                         f"{'louder' if moved > 0 else 'quieter'} than before")
        new = {f.content_hash for f in self.change.added}
        if not any(f.content_hash in new for f in dataset.validation_files):
            notes.append("none of the added files is held out for validation, so what the model learns of them "
                         "cannot be measured (prepare --validation PATTERN holds some out)")
        if not any(f.content_hash not in new for f in dataset.validation_files):
            notes.append("none of the old files is held out for validation any more, so forgetting cannot be measured")
        if not any(f.content_hash not in new for f in dataset.train_files):
            notes.append("none of the old run's training files is left to replay: the model will drift toward "
                         "the added files and forget the old ones")
        return notes


class ReplaySchedule:
    """File weights for the training sampler of a run that grows an old one.

    Every file starts from its plain weight (duration ** power); at the start of the run each
    added file's weight is multiplied by `boost`, the factor falling linearly to 1 over the first
    `focus` of the run. Old files are never dropped: their weights are never lowered, only
    outnumbered by a bounded factor (the config keeps `boost` finite)."""

    def __init__(self, base: np.ndarray, is_new: np.ndarray, boost: float, focus: float) -> None:
        self.base = np.asarray(base, dtype=np.float64) / float(np.sum(base))
        self.is_new = np.asarray(is_new, dtype=bool)
        self.boost = boost
        self.focus = focus
        self.natural = float(self.base[self.is_new].sum())   # the added files' share under plain weights

    def factor(self, progress: float) -> float:
        """The added files' weight multiplier at `progress` (0..1) of the run."""
        left = max(0.0, 1.0 - progress / self.focus) if self.focus > 0 else 0.0
        return 1.0 + (self.boost - 1.0) * left

    def weights(self, progress: float) -> np.ndarray:
        """Draw probabilities of the files `(files,)`, summing to 1."""
        p = np.where(self.is_new, self.base * self.factor(progress), self.base)
        return p / p.sum()

    def share(self, progress: float) -> float:
        """The added files' share of the draws at `progress`."""
        return float(self.weights(progress)[self.is_new].sum())


@torch.no_grad()
def anchor_step(model: nn.Module, anchor: list[torch.Tensor], lr: float, strength: float) -> None:
    """Move every weight of `model` by `lr * strength` of its distance back to `anchor` (the old
    run's weights, in `model.parameters()` order): L2 toward the old weights, decoupled from the
    gradient as AdamW decouples weight decay, so Adam's scaling does not undo it."""
    for p, p0 in zip(model.parameters(), anchor):
        p.lerp_(p0, lr * strength)


def control_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Labels of two models' controls (metadata `controls` entries) compared: `kept` (a patch's
    mapping by that label still finds a control), `gone` (its mappings go idle), `added`, and
    `moved` (kept labels at another decode index: a mapping by index reaches another control)."""
    before = {c["label"]: c for c in old}
    after = {c["label"]: c for c in new}
    return {"kept": [label for label in after if label in before],
            "gone": [label for label in before if label not in after],
            "added": [label for label in after if label not in before],
            "moved": [label for label in after
                      if label in before and before[label].get("index") != after[label].get("index")]}


# -- export: the lineage in the model file, and what became of the old model's controls ---------

EXPORTED = "exported.json"   # in a run folder: the controls of its latest export


def record_export(run_dir: Path, model_path: Path, metadata: dict[str, Any]) -> None:
    """Keep in the run folder (atomically) which file was exported last and its controls, so that
    a run grown from this one can say at its own export which labels a patch still finds."""
    from training.checkpoint import atomic_write_bytes
    record = {"model": str(Path(model_path).resolve()), "name": metadata.get("name"),
              "controls": [{"index": c["index"], "label": c["label"], "source": c.get("source")}
                           for c in metadata["controls"]]}
    atomic_write_bytes(Path(run_dir) / EXPORTED, json.dumps(record, indent=1).encode())


def exported_record(run_dir: Path) -> dict[str, Any] | None:
    """What `record_export` kept in `run_dir`, None where the run was never exported (or the
    record is unreadable)."""
    try:
        record = json.loads((Path(run_dir) / EXPORTED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("controls"), list) else None


def lineage_metadata(lineage: dict[str, Any], controls: list[dict[str, Any]]) -> dict[str, Any]:
    """The model file's `lineage`: the run it grew from (folder, step, data), the files added and
    removed (path, content hash, split), and, where the old run was exported, its model file and
    what became of its control labels (`control_changes`); `previous` is the old run's own."""
    old = exported_record(Path(lineage["from_run"]))
    return {**{k: lineage[k] for k in ("from_run", "from_checkpoint", "from_step", "from_manifest_hash",
                                       "from_data", "added", "removed", "unchanged")},
            "from_model": old["model"] if old else None,
            "controls": control_changes(old["controls"], controls) if old else None,
            "previous": lineage.get("previous")}


def describe_control_changes(lineage: dict[str, Any]) -> list[str]:
    """Lines for export's terminal output: which labels a patch for the old model still finds."""
    changes = lineage.get("controls")
    if changes is None:
        return [f"controls: {lineage['from_run']} was never exported, so there is no old patch to compare with"]
    lines = [f"controls against {lineage['from_model']}: "
             + ("same labels" if not changes["gone"] and not changes["added"] else "labels changed")
             + f"; a patch for it finds {len(changes['kept'])} of its {len(changes['kept']) + len(changes['gone'])} "
             f"controls by label"]
    if changes["gone"]:
        lines.append(f"  gone (their mappings go idle): {', '.join(changes['gone'])}")
    if changes["added"]:
        lines.append(f"  new: {', '.join(changes['added'])}")
    if changes["moved"]:
        lines.append("  at another decode index (mappings by index reach another control): "
                     + ", ".join(changes["moved"]))
    if any(label.startswith("timbre_") for label in changes["kept"]):
        lines.append("  timbre_1.. are the most important remaining directions measured afresh: same names, "
                     "not necessarily the same sounds")
    return lines
