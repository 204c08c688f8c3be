"""`synthd-train train`: fit the causal VAE to a prepared set.

The run stops after `--steps` optimiser steps or `--minutes` of wall time (default 20). The
learning-rate decay, the KL warm-up and the start of the adversarial stage follow the
fraction of that budget already used, so a short run and a long one each end converged.
Every step's randomness is derived from (seed, process rank, step), which is why a resumed
run repeats the losses of an uninterrupted one exactly (same machine, `--steps` budget).

Under `torchrun --nproc_per_node=N` it trains data-parallel (DDP: gloo on CPU, NCCL on CUDA);
only rank 0 writes the run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import faulthandler
import io
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OpenMP threads that spin while waiting make every step several times slower as soon as another
# process wants the same cores (measured 7x on a busy 2-core machine); sleeping waiters cost
# nothing when the cores are free. Only effective before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist
from torch import Tensor, nn

from training.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig, config_to_dict, load_config, overlay, save_config
from training.data import CropSampler, ValidationSet
from training.augment import Augmenter
from training.incremental import (FORGETTING_TOLERANCE, IncrementalError, Origin, ReplaySchedule, anchor_step,
                                  check_model, file_records)
from training.losses import (MultiResolutionSpectralLoss, collapsed_dims, free_bits_kl, kl_beta,
                             kl_per_dim)

DEFAULT_MINUTES = 20.0
# seconds between checkpoints written on top of those at each validation
CHECKPOINT_INTERVAL_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="a prepared set (synthd-train prepare)")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder for checkpoints, config and log")
    parser.add_argument("--config", metavar="C.toml", help="TOML file overriding the default config")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help=f"wall-clock budget (default {DEFAULT_MINUTES:g})")
    budget.add_argument("--steps", type=int, help="number of optimiser steps")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    parser.add_argument("--from", dest="from_run", metavar="OLD_RUN",
                        help="start from OLD_RUN's best weights and config on a set grown since: reports the files "
                             "added, removed and unchanged, replays the old files beside the new, validates both apart")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--regularize", metavar="A,B,...", type=_attribute_list, default=None,
                        help="bind latent dimension k to the k-th attribute (loudness, brightness, pitch, "
                             "noisiness, attack), overriding [regularize] attributes of the config")


def _attribute_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def select_device(requested: str | None) -> torch.device:
    """The requested device, or CUDA, then Apple MPS, then CPU, whichever exists first."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {requested}: Apple MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Budget:
    """When the run ends: after `steps` steps, or after `seconds` of (cumulative) wall time."""

    steps: int | None = None
    seconds: float | None = None

    def progress(self, step: int, elapsed: float) -> float:
        """Fraction of the run done, in [0, 1]."""
        if self.steps is not None:
            return min(1.0, step / self.steps)
        return min(1.0, elapsed / self.seconds)

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.seconds / 60:g} minutes"


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over the first steps, then cosine decay to `final_lr_ratio` at the end."""
    o = cfg.optim
    warm = min(1.0, (step + 1) / max(1, o.warmup_steps))
    decay = o.final_lr_ratio + (1 - o.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return o.lr * warm * decay


def _step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The random source of one step of one process, independent of everything before it."""
    sequence = np.random.SeedSequence([seed, rank, step])
    torch.manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))
    return np.random.default_rng(sequence)


class RunLog:
    """log.csv (always) and TensorBoard (when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, columns: list[str], resume_step: int | None) -> None:
        self.path = run_dir / "log.csv"
        self.columns = columns
        if resume_step is not None and self.path.exists():
            # rows past the checkpoint will be logged again by the resumed run
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= resume_step]
        else:
            rows = []
        # replaced in one step: a kill here leaves the old log, not an empty one
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode())
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            pass
        else:
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        line = ",".join(_format(row.get(c)) for c in self.columns) + "\n"
        with open(self.path, "a") as fh:  # one write per row: a kill leaves at most one partial line
            fh.write(line)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, float):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class Meter:
    """Running sums of the training losses between two log rows, over the steps applied; the
    steps skipped for a non-finite gradient are counted apart."""

    sums: dict[str, float] = field(default_factory=dict)
    kl_dims: Tensor | None = None
    count: int = 0
    skipped: int = 0
    # steps that gave each figure, where not all did (the adversarial ones start mid-run, a
    # skipped discriminator step gives none)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, float], kl_dims: Tensor) -> None:
        for k, v in values.items():
            # a figure summed before with no count of its own (a checkpoint older than counts) came every step
            self.counts[k] = self.counts.get(k, self.count if k in self.sums else 0) + 1
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.kl_dims = kl_dims.clone() if self.kl_dims is None else self.kl_dims + kl_dims
        self.count += 1

    def row(self) -> dict[str, float]:
        """The log row's training columns: each figure's mean over the applied steps that gave
        it, and the count of steps skipped."""
        row: dict[str, float] = {"skipped": float(self.skipped)}
        if self.count:
            row.update({k: v / self.counts.get(k, self.count) for k, v in self.sums.items()})
            row.update({f"kl_{i}": float(v) for i, v in enumerate(self.kl_dims / self.count)})
        return row

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "kl_dims": self.kl_dims, "count": self.count, "skipped": self.skipped,
                "counts": dict(self.counts)}


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to save and stop at the next step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now, the last checkpoint stands
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run (one process of it under DDP)."""

    # what a grown run (`--from`) keeps of its origin, None for a run of its own; and the progress
    # line, once training has started (class defaults: the bookkeeping works before either exists)
    lineage: dict[str, Any] | None = None
    progress_bar: Any = None

    def __init__(self, args: argparse.Namespace) -> None:
        from training.dataset import PreparedSet
        from training.model import VAE

        self.run_dir = Path(args.run_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = select_device(args.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.main = self.rank == 0

        self.dataset = PreparedSet.open(args.dataset_dir)
        resume = self._resume_state(args)
        # the run this one grows (`--from`): its checkpoint, and the set's change since
        self.origin: Origin | None = None
        self.lineage: dict[str, Any] | None = resume.get("lineage") if resume is not None else None
        if resume is None and args.from_run is not None:
            self.origin = Origin.open(Path(args.from_run), self.dataset, args.dataset_dir)
            self.lineage = self.origin.lineage
        if resume is None:
            if self.origin is not None:
                # the old run's config, with what --config names in place of its values
                cfg = overlay(self.origin.config, args.config)
                check_model(config_to_dict(self.origin.config)["model"], config_to_dict(cfg)["model"],
                            self.origin.run_dir)
            else:
                cfg = load_config(args.config)
            self.cfg = self._with_regularize(cfg, args.regularize)
            self.seed = 0 if args.seed is None else args.seed
        else:
            self.cfg = self._resume_config(args, resume)
            self.seed = resume["seed"] if args.seed is None else args.seed
            if self.seed != resume["seed"]:
                raise ConfigError(f"--seed {args.seed}: the run was started with seed {resume['seed']}")
        self.budget = self._budget(args, resume)
        cfg = self.cfg

        sample_rate = int(self.dataset.preprocessing["sample_rate"])
        if sample_rate != cfg.model.sample_rate:
            raise ConfigError(f"model.sample_rate: {cfg.model.sample_rate} but the prepared set is at {sample_rate} Hz")
        if self.device.type == "cpu":
            threads = cfg.optim.threads or max(1, (os.cpu_count() or 1) // self.world)
            torch.set_num_threads(threads)

        torch.manual_seed(self.seed)  # the initial weights depend on the seed alone
        model = VAE(cfg.model).to(self.device)
        if self.origin is not None:
            self.origin.load_weights(model, "model")
        if cfg.model.harmonics > 0:
            # the grown set's typical pitch, not the old set's: what the analysis holds at export
            model.default_condition.copy_(typical_condition(self.dataset))
        self.model = model
        # the averaged weights are what validation sees and what best.pt and the export carry
        self.ema = copy.deepcopy(model).requires_grad_(False) if cfg.optim.ema_decay > 0 else None
        if self.ema is not None and self.origin is not None:
            self.origin.load_weights(self.ema, "ema")
            self.ema.default_condition.copy_(model.default_condition)
        self.eval_model = self.ema if self.ema is not None else model
        # a grown run's average continues the old one's rather than restarting its warm-up
        self.ema_offset = int(self.lineage["from_step"]) if self.lineage is not None else 0
        # the old weights a grown run is pulled toward (incremental.anchor)
        self.anchor: list[Tensor] | None = None
        if self.lineage is not None and cfg.incremental.anchor > 0 and resume is None:
            self.anchor = [p.detach().clone() for p in model.parameters()]
        self.hop = cfg.model.hop
        # the losses ask for nothing above the decoder's band limit, tapered as the decoder's is: a
        # target's content there (cymbals, noise) pushed the top bins up until their leakage
        # reached it, a steady whistle at 19.6 kHz on every reconstruction
        self.spectral = MultiResolutionSpectralLoss(cfg.loss.stft_fft_sizes, cfg.loss.mel_fft_sizes,
                                                    cfg.loss.n_mels, sample_rate,
                                                    band_limit=band_limit(cfg.model)).to(self.device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        if self.origin is not None:
            # Adam's moments are those of the weights it starts from: no shock of fresh estimates
            self.optimizer.load_state_dict(self.origin.ckpt["optimizer"])
        adversarial = cfg.adversarial.enabled
        self.adversarial = adversarial == "on" or (adversarial == "auto" and self.device.type == "cuda")
        self.discriminators = None
        if self.adversarial:
            from training.discriminators import Discriminators
            torch.manual_seed(self.seed + 1)
            self.discriminators = Discriminators(cfg.adversarial.periods, cfg.adversarial.fft_sizes,
                                                 cfg.adversarial.channels,
                                                 cfg.adversarial.normalization).to(self.device)
            self.disc_optimizer = torch.optim.AdamW(self.discriminators.parameters(), lr=cfg.adversarial.lr,
                                                    betas=(0.5, 0.9))
            if self.origin is not None and "discriminators" in self.origin.ckpt:
                self.discriminators.load_state_dict(self.origin.ckpt["discriminators"])
                self.disc_optimizer.load_state_dict(self.origin.ckpt["disc_optimizer"])
        # bfloat16 autocast needs no loss scaling, so a resumed run has no scaler state to restore
        self.amp = (cfg.optim.amp and self.device.type == "cuda" and torch.cuda.is_bf16_supported())

        self.train_model: nn.Module = model
        self.train_disc = self.discriminators
        if self.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            if self.discriminators is not None:
                self.train_disc = nn.parallel.DistributedDataParallel(self.discriminators, device_ids=ids)

        train_audio = [self.dataset.load(f) for f in self.dataset.train_files]
        # the decoder's warm-up, rounded up to whole frames: losses skip it (see training.data)
        self.context = -(-model.warmup_samples // self.hop) * self.hop
        self.sampler = CropSampler(train_audio, cfg.data.crop_frames * self.hop, cfg.data.batch_size,
                                   Augmenter(cfg.augment, sample_rate), cfg.data.file_weight_power,
                                   self.context)
        added = {f["content_hash"] for f in self.lineage["added"]} if self.lineage is not None else set()
        self.replay: ReplaySchedule | None = None
        if self.lineage is not None:
            is_new = np.array([f.content_hash in added for f in self.dataset.train_files])
            self.replay = ReplaySchedule(self.sampler.p, is_new, cfg.incremental.new_boost, cfg.incremental.new_focus)
        # held-out files by group ("old" and "new" for a grown run, one group otherwise), each group
        # with its share of the validation budget; the figures of all of them are summed from the groups'
        self.validation = self._validation_groups(added, sample_rate)
        self.data_summary = self.dataset.summary()

        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.overfit_streak = 0
        self.skipped_steps = 0  # steps whose gradient was not finite, over the whole run
        self.skip_streak = 0    # ... in a row, up to now
        self.disc_skipped = 0   # discriminator steps skipped the same way
        self.finished = False
        self.meter = Meter()
        self.interval_train: list[float] = []  # training reconstruction losses since the last validation
        if resume is not None:
            self._restore(resume)

    # -- set-up helpers -------------------------------------------------------------------

    def _resume_state(self, args: argparse.Namespace) -> dict[str, Any] | None:
        last = self.run_dir / "last.pt"
        if args.resume and args.from_run is not None and last.exists():
            grown = (load_checkpoint(last, map_location="cpu").get("lineage") or {}).get("from_run")
            if grown is None or Path(grown) != Path(args.from_run).resolve():
                raise IncrementalError(f"--from {args.from_run}: the run being resumed "
                                       + (f"grew {grown}" if grown else "was not started with --from")
                                       + "; a resumed run keeps its origin (drop --from)")
        if not args.resume:
            if last.exists():
                raise FileExistsError(f"{self.run_dir}: already holds a run; add --resume to continue it "
                                      "or choose another RUN_DIR")
            return None
        if not last.exists():
            raise FileNotFoundError(f"{self.run_dir}: nothing to resume (no last.pt)")
        ckpt = load_checkpoint(last, map_location="cpu")
        if ckpt.get("manifest_hash") != self.dataset.manifest_hash:
            raise ValueError(f"{args.dataset_dir}: not the prepared set this run was trained on "
                             f"(manifest hash differs from {last})")
        return ckpt

    def _resume_config(self, args: argparse.Namespace, ckpt: dict[str, Any]) -> TrainConfig:
        from training.config import checkpoint_config
        cfg = checkpoint_config(ckpt["config"], f"{self.run_dir / 'last.pt'} config")
        if args.config is not None and config_to_dict(load_config(args.config)) != config_to_dict(cfg):
            raise ConfigError(f"{args.config}: differs from the config of the run being resumed "
                              f"({self.run_dir / 'config.toml'}); a resumed run keeps its config")
        wanted = args.regularize
        if wanted is not None and wanted != cfg.regularize.attributes:
            raise ConfigError(f"--regularize {','.join(wanted)}: the run being resumed regularises "
                              f"{','.join(cfg.regularize.attributes) or 'nothing'}; a resumed run keeps its config")
        return cfg

    @staticmethod
    def _with_regularize(cfg: TrainConfig, attributes: list[str] | None) -> TrainConfig:
        """`cfg` with `--regularize`'s attributes in place of the config's (validated like the config)."""
        if attributes is None:
            return cfg
        from training.config import config_from_dict
        values = config_to_dict(cfg)
        values["regularize"]["attributes"] = attributes
        return config_from_dict(values, "--regularize")

    @staticmethod
    def _budget(args: argparse.Namespace, ckpt: dict[str, Any] | None) -> Budget:
        if args.steps is not None:
            if args.steps <= 0:
                raise ValueError(f"--steps {args.steps}: must be positive")
            return Budget(steps=args.steps)
        if args.minutes is not None:
            if args.minutes <= 0:
                raise ValueError(f"--minutes {args.minutes:g}: must be positive")
            return Budget(seconds=args.minutes * 60.0)
        if ckpt is not None:
            return Budget(**ckpt["budget"])
        return Budget(seconds=DEFAULT_MINUTES * 60.0)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.discriminators is not None and "discriminators" in ckpt:
            self.discriminators.load_state_dict(ckpt["discriminators"])
            self.disc_optimizer.load_state_dict(ckpt["disc_optimizer"])
        if self.lineage is not None and ckpt.get("anchor") is not None:
            self.anchor = [t.to(self.device) for t in ckpt["anchor"]]
        self.step = int(ckpt["step"])
        self.elapsed = float(ckpt["elapsed_s"])
        self.history = list(ckpt["history"])
        self.best = ckpt["best"]
        self.overfit_streak = int(ckpt["overfit_streak"])
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self.skip_streak = int(ckpt.get("skip_streak", 0))
        self.disc_skipped = int(ckpt.get("disc_skipped", 0))
        self.meter = Meter(**ckpt["meter"])
        self.interval_train = list(ckpt["interval_train"])

    # -- training -------------------------------------------------------------------------

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, progress: float) -> tuple[dict[str, float], Tensor] | None:
        """One optimiser step: the step's figures and KL per latent dimension, or None where the
        gradient was not finite and the step was skipped (the weights are as they were)."""
        cfg = self.cfg
        rng = _step_rng(self.seed, self.rank, self.step)
        weights = self.replay.weights(progress) if self.replay is not None else None
        target, inputs = (t.to(self.device) for t in self.sampler.batch(rng, weights))
        lr = learning_rate(cfg, self.step, progress)
        if self.lineage is not None:
            lr *= cfg.incremental.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # a grown run's latents were shaped under the full KL weight: warming it up again from
        # nothing would let them spread before it returns
        beta = cfg.kl.beta if self.lineage is not None else kl_beta(progress, cfg.kl.beta_start, cfg.kl.beta,
                                                                      cfg.kl.warmup)

        self.train_model.train()
        # pitch and voicing of what the decoder must make (the clean crop), by the model's tracker
        condition = self.model.condition(target)
        with self._autocast():
            y, mean, logvar = self.train_model(inputs, condition)
        full_target = target
        y = y.float()[..., self.context:]
        target = target[..., self.context:]
        terms = self.spectral.terms(y, target)
        recon = self._reconstruction(terms)
        kl_dims = kl_per_dim(mean.float(), logvar.float())
        kl = free_bits_kl(kl_dims, cfg.kl.free_bits)
        loss = recon + beta * kl
        values = {"lr": lr, "beta": beta, "recon": recon.item(), "sc": terms.batch_spectral_convergence().item(),
                  "logmag": terms.log_magnitude.mean().item(), "kl": kl_dims.sum().item()}
        if terms.log_mel is not None:
            values["mel"] = terms.log_mel.mean().item()

        if cfg.regularize.attributes:
            regularize = self._regularize(full_target, mean.float())
            values["regularize"] = regularize.item()
            loss = loss + cfg.regularize.weight * regularize

        if self.discriminators is not None and progress >= cfg.adversarial.start:
            loss = loss + self._adversarial(y, target, recon, values)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not finite_step(self.optimizer, self.model.parameters(), cfg.optim.grad_clip):
            return None
        if self.anchor is not None:
            anchor_step(self.model, self.anchor, lr, cfg.incremental.anchor)
        if self.ema is not None:
            self._update_ema()
        values["loss"] = loss.item()
        if self.replay is not None:
            values["new_share"] = self.replay.share(progress)
        return values, kl_dims.detach().float().cpu()

    @torch.no_grad()
    def _update_ema(self) -> None:
        # the effective decay starts low, so the average is not anchored to the random start
        step = self.step + self.ema_offset
        decay = min(self.cfg.optim.ema_decay, (1 + step) / (10 + step))
        for averaged, trained in zip(self.ema.parameters(), self.model.parameters()):
            averaged.lerp_(trained, 1.0 - decay)

    def _reconstruction(self, terms) -> Tensor:
        w = self.cfg.loss
        recon = (w.spectral_convergence_weight * terms.batch_spectral_convergence()
                 + w.log_magnitude_weight * terms.log_magnitude.mean())
        if terms.log_mel is not None:
            recon = recon + w.mel_weight * terms.log_mel.mean()
        return recon

    def _regularize(self, audio: Tensor, mean: Tensor) -> Tensor:
        """Attribute-ordering term: attribute k of `audio` `(batch, 1, samples)` orders latent
        dimension k of the posterior means `(batch, latent, frames)`."""
        from training.descriptors import attribute_regularization_loss, attribute_targets
        names = self.cfg.regularize.attributes
        targets = attribute_targets(audio, names)
        frames = min(mean.shape[-1], *(t.shape[-1] for t in targets.values()))
        return attribute_regularization_loss(mean[..., :frames], {n: t[..., :frames] for n, t in targets.items()},
                                             {n: i for i, n in enumerate(names)}, self.cfg.regularize.delta)

    def _adversarial(self, y: Tensor, target: Tensor, recon: Tensor, values: dict[str, float]) -> Tensor:
        """One discriminator update, then the generator's adversarial + feature-matching loss."""
        from training.discriminators import (discriminator_loss, feature_matching_loss, generator_loss,
                                             guard_ratio, split_verdicts)
        a = self.cfg.adversarial
        n = target.shape[0]
        with self._autocast():
            real, fake = split_verdicts(self.train_disc(torch.cat([target, y.detach()])), n)
            d_loss = discriminator_loss(real, fake, a.loss)
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.float().backward()
        disc_stepped = finite_step(self.disc_optimizer, self.discriminators.parameters(), 0.0)
        self.disc_skipped += not disc_stepped
        # the generator's pass needs no gradient sync of the discriminators (theirs are discarded)
        with self._autocast():
            with torch.no_grad():
                real = self.discriminators(target)
            fake = self.discriminators(y)
            g_loss = a.adversarial_weight * generator_loss(fake, a.loss)
            fm_loss = a.feature_matching_weight * feature_matching_loss(real, fake)
        total = guard_ratio((g_loss + fm_loss).float(), recon, a.max_loss_ratio)
        values.update(adv=g_loss.item(), feature_matching=fm_loss.item())
        if disc_stepped:
            values["disc"] = d_loss.item()
        return total

    def _validation_groups(self, added: set[str], sample_rate: int) -> dict[str, ValidationSet]:
        """The held-out crops by group: `{"all": ...}`, or for a grown run `"old"` (files the old run
        had) and `"new"` (files added since), whichever holds files, each with its files' share of
        `validation.max_seconds`."""
        files = self.dataset.validation_files
        if self.lineage is None:
            groups = {"all": files}
        else:
            groups = {"old": [f for f in files if f.content_hash not in added],
                      "new": [f for f in files if f.content_hash in added]}
        v = self.cfg.validation
        return {name: ValidationSet.build([self.dataset.load(f) for f in group], v.crop_frames * self.hop,
                                          v.max_seconds * len(group) / len(files), sample_rate, self.context)
                for name, group in groups.items() if group}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The training losses on the held-out crops (posterior mean, no noise), all processes' share,
        for the weights in use (the moving average when there is one). A grown run adds
        `val_old_distance` and `val_new_distance`: the distance on each group of held-out files."""
        sums = {name: self._validation_sums(crops) for name, crops in self.validation.items()}
        if self.world > 1:
            # NCCL reduces CUDA tensors only (gloo takes either); one reduction for every group
            shared = torch.stack(list(sums.values())).to(self.device)
            dist.all_reduce(shared)
            sums = dict(zip(sums, shared.cpu()))
        figures = self._validation_figures(sum(sums.values()))
        if self.lineage is not None:
            for name, group in sums.items():
                figures[f"val_{name}_distance"] = self._validation_figures(group)["val_distance"]
        return figures

    @torch.no_grad()
    def _validation_sums(self, crops: ValidationSet) -> Tensor:
        """This process's sums over `crops` `(2 * resolutions + 3 + latent,)` float64: error and target
        energy per resolution, log magnitude, log mel, crop count, KL per dimension. Sums, so that
        groups and processes add up; spectral convergence is taken over all crops as one signal (as
        in training)."""
        model = self.eval_model
        model.eval()
        latent = self.cfg.model.latent_size
        resolutions = max(1, len(self.cfg.loss.stft_fft_sizes))
        sums = torch.zeros(2 * resolutions + 3 + latent, dtype=torch.float64)
        for batch in crops.batches(self.cfg.data.batch_size, self.rank, self.world):
            batch = batch.to(self.device)
            with self._autocast():
                y, mean, logvar = model(batch)
            terms = self.spectral.terms(y.float()[..., self.context:], batch[..., self.context:])
            mel = terms.log_mel.sum() if terms.log_mel is not None else torch.zeros(())
            kl = kl_per_dim(mean.float(), logvar.float()) * batch.shape[0]
            sums += torch.cat([terms.error_energy.sum(1), terms.target_energy.sum(1),
                               terms.log_magnitude.sum().reshape(1), mel.reshape(1),
                               torch.tensor([float(batch.shape[0])], device=kl.device), kl]).double().cpu()
        return sums

    def _validation_figures(self, sums: Tensor) -> dict[str, Any]:
        """The validation figures of summed crops (`_validation_sums`, of one group or several)."""
        resolutions = max(1, len(self.cfg.loss.stft_fft_sizes))
        r = resolutions
        count = float(sums[2 * r + 2])
        sc = float((sums[:r] / sums[r:2 * r].clamp(min=1e-12)).sqrt().mean()) if self.cfg.loss.stft_fft_sizes else 0.0
        lm, mel = float(sums[2 * r]) / count, float(sums[2 * r + 1]) / count
        kl_dims = (sums[2 * r + 3:] / count).float()
        w = self.cfg.loss
        recon = w.spectral_convergence_weight * sc + w.log_magnitude_weight * lm
        if self.cfg.loss.mel_fft_sizes:
            recon += w.mel_weight * mel
        score = recon + self.cfg.kl.beta * float(free_bits_kl(kl_dims, self.cfg.kl.free_bits))
        return {"val_sc": sc, "val_logmag": lm, "val_mel": mel, "val_distance": sc + lm, "val_recon": recon,
                "val_kl": float(kl_dims.sum()), "val_score": score, "kl_dims": kl_dims.tolist()}

    def _checkpoint(self) -> dict[str, Any]:
        ckpt = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed,
            "seed": self.seed,
            "budget": {"steps": self.budget.steps, "seconds": self.budget.seconds},
            "config": config_to_dict(self.cfg),
            "manifest_hash": self.dataset.manifest_hash,
            "dataset_dir": str(Path(self.dataset.root).resolve()),
            "preprocessing": dict(self.dataset.preprocessing),
            "data_summary": self.data_summary,
            # what a later `--from` run compares its set with, by content hash
            "files": file_records(self.dataset),
            "lineage": self.lineage,
            "history": self.history,
            "best": self.best,
            "overfit_streak": self.overfit_streak,
            "skipped_steps": self.skipped_steps,
            "skip_streak": self.skip_streak,
            "disc_skipped": self.disc_skipped,
            "meter": self.meter.state(),
            "interval_train": list(self.interval_train),
            "latency_samples": int(self.model.latency_samples),
            "finished": self.finished,
        }
        if self.ema is not None:
            ckpt["ema"] = self.ema.state_dict()
        if self.anchor is not None:
            ckpt["anchor"] = [t.cpu() for t in self.anchor]
        if self.discriminators is not None:
            ckpt["discriminators"] = self.discriminators.state_dict()
            ckpt["disc_optimizer"] = self.disc_optimizer.state_dict()
        return ckpt

    def _agree(self, stop: bool) -> bool:
        """Rank 0's decision to stop, shared so that every process stops at the same step."""
        if self.world == 1:
            return stop
        flag = torch.tensor([1 if stop else 0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def _say(self, message: str) -> None:
        if self.main:
            print(message, file=sys.stderr, flush=True)

    def fit(self) -> int:
        """Train until the budget is spent or a signal arrives; returns the exit status."""
        from training.progress import Progress

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:  # leftovers of writes cut short by a kill; the files they were replacing are intact
            for stale in [*self.run_dir.glob(".*.pt.*.tmp"), *self.run_dir.glob(".config.toml.*.tmp"),
                          *self.run_dir.glob(".log.csv.*.tmp")]:
                stale.unlink(missing_ok=True)
        latent = cfg.model.latent_size
        columns = (["step", "elapsed_s", "lr", "beta", "loss", "recon", "sc", "logmag", "mel", "kl",
                    "regularize", "disc", "adv", "feature_matching", "new_share", "skipped", "val_sc", "val_logmag",
                    "val_mel", "val_distance", "val_old_distance", "val_new_distance", "val_recon", "val_kl",
                    "val_score", "warning"] + [f"kl_{i}" for i in range(latent)])
        log = RunLog(self.run_dir, columns, self.step if self.history or self.step else None) if self.main else None
        if self.main:
            save_config(cfg, self.run_dir / "config.toml")
            self._say(f"training on {self.device} ({self.world} process{'es' if self.world > 1 else ''}), "
                      f"{self.data_summary['train_files']} training / {self.data_summary['validation_files']} "
                      f"validation files, budget {self.budget.describe()}, adversarial "
                      f"{'on' if self.adversarial else 'off'}, seed {self.seed}"
                      + (f", resuming at step {self.step}" if self.step else ""))
            if self.origin is not None:
                o = self.origin
                self._say(f"from {o.run_dir} ({o.checkpoint.name}, step {o.ckpt.get('step', 0)}): "
                          + "\n".join(o.change.report()))
                for note in o.notes(self.dataset):
                    self._say(f"warning: {note}")
                if self.replay.is_new.all():
                    strategy = "no old training file to replay"
                elif self.replay.boost == 1.0:
                    strategy = f"replaying old files: the added files take {self.replay.natural:.0%} of the draws"
                else:
                    strategy = (f"replaying old files: the added files' share of the draws falls from "
                                f"{self.replay.share(0.0):.0%} to {self.replay.natural:.0%} over the first "
                                f"{cfg.incremental.new_focus:.0%} of the run")
                anchor = cfg.incremental.anchor
                self._say(f"{strategy}; learning rate x{cfg.incremental.lr_scale:g}"
                          + (f", anchored to the old weights ({anchor:g})" if anchor else ""))
        by_time = self.budget.steps is None
        remaining = (int(math.ceil(self.budget.seconds - self.elapsed)) if by_time
                     else self.budget.steps - self.step)
        progress_bar = Progress(remaining, "train", unit="s" if by_time else "step") if self.main else None
        self.progress_bar = progress_bar
        shown = int(self.elapsed) if by_time else self.step
        last_save = time.monotonic()
        status = 0
        # a signal from here on is a request to save and stop: during the first and last validations too
        with StopRequest() as stop:
            if not self.history:  # the untrained model's figures: what training is measured against
                row = self._validation_round({"step": 0, "elapsed_s": 0.0})
                if log is not None:
                    log.write(row)
            started = time.monotonic() - self.elapsed
            while True:
                self.elapsed = time.monotonic() - started
                progress = self.budget.progress(self.step, self.elapsed)
                if self._agree(progress >= 1.0 or stop.signal is not None or self.diverged):
                    break
                taken = self._train_step(progress)
                self.step += 1
                self._count_skip(taken is None)
                if taken is not None:
                    values, kl_dims = taken
                    self.meter.add(values, kl_dims)
                    self.interval_train.append(values["recon"])
                self.elapsed = time.monotonic() - started
                if progress_bar is not None:
                    now = int(self.elapsed) if by_time else self.step
                    shown_values = ({"loss": f"{values['loss']:.3f}", "kl": f"{values['kl']:.2f}"} if taken
                                    else {"loss": "skipped", "kl": "-"})
                    progress_bar.update(now - shown, **shown_values, step=self.step)
                    shown = now
                row = None
                if self.step % cfg.validation.log_every_steps == 0 or self.diverged:
                    row = {"step": self.step, "elapsed_s": self.elapsed, **self.meter.row()}
                    self.meter = Meter()
                if self.diverged:  # its weights are those of the last finite step: no validation
                    if row is not None and log is not None:
                        log.write(row)
                    continue
                if self.step % cfg.validation.every_steps == 0:
                    row = self._validation_round(row or {"step": self.step, "elapsed_s": self.elapsed})
                    last_save = time.monotonic()
                elif time.monotonic() - last_save > CHECKPOINT_INTERVAL_S:
                    if self.main:
                        save_checkpoint(self.run_dir / "last.pt", self._checkpoint())
                    last_save = time.monotonic()
                if row is not None and log is not None:
                    log.write(row)
            if self.diverged:  # over a signal that came meanwhile: resuming would stop here again
                status = 1
            elif stop.signal is not None:
                status = 128 + stop.signal
            if progress_bar is not None:
                progress_bar.close()
            self.finished = status == 0
            if status == 0 and (not self.history or self.history[-1]["step"] != self.step):
                trained = self.meter.row() if self.meter.count or self.meter.skipped else {}
                row = self._validation_round({"step": self.step, "elapsed_s": self.elapsed, **trained})
                if log is not None:
                    log.write(row)
            elif self.main:
                save_checkpoint(self.run_dir / "last.pt", self._checkpoint())
        if log is not None:
            log.close()
        self._summary(status)
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return status

    def _count_skip(self, skipped: bool) -> None:
        """Keep count of the steps skipped for a non-finite gradient; warn at the first of a run
        of them."""
        if not skipped:
            self.skip_streak = 0
            return
        self.skipped_steps += 1
        self.skip_streak += 1
        self.meter.skipped += 1
        if self.skip_streak == 1:
            lr = self.optimizer.param_groups[0]["lr"]
            self._say(f"warning: step {self.step}: the loss or its gradient was not finite (NaN or inf) at learning "
                      f"rate {lr:.3g}; the step was skipped and the weights kept (the run stops after "
                      f"{self.cfg.optim.nonfinite_patience} in a row)")

    @property
    def diverged(self) -> bool:
        """Whether `optim.nonfinite_patience` steps in a row were skipped: the run stops (and a run
        resumed from that point stops again at once, as the run it continues did)."""
        return self.skip_streak >= self.cfg.optim.nonfinite_patience

    def _validation_round(self, row: dict[str, Any]) -> dict[str, Any]:
        """Validate, update best/overfitting state, save checkpoints; returns the log row."""
        val = self.validate()
        train_recon = float(np.mean(self.interval_train)) if self.interval_train else float("nan")
        self.interval_train = []
        record = {"step": self.step, "train_recon": train_recon, **val}
        previous = self.history[-1] if self.history else None
        self.history.append(record)
        row = {**row, **val}
        if previous is not None and val["val_recon"] > previous["val_recon"] and train_recon < previous["train_recon"]:
            self.overfit_streak += 1
        else:
            self.overfit_streak = 0
        warnings_ = []
        if self.overfit_streak >= self.cfg.validation.overfit_patience:
            warning = (f"validation loss rose for {self.overfit_streak} checks while training loss fell: "
                       "overfitting (more data or augmentation would help; best.pt keeps the best model)")
            warnings_.append("overfitting")
            self._say(f"warning: step {self.step}: {warning}")
        rise = self._old_rise()
        if rise is not None and rise > FORGETTING_TOLERANCE:
            warnings_.append("forgetting")
            self._say(f"warning: step {self.step}: validation on the old files is {rise:.1%} above where the old "
                      f"run left it ({self.history[0]['val_old_distance']:.4f} -> {val['val_old_distance']:.4f}): "
                      "the model is forgetting them (a lower incremental.lr_scale or a higher "
                      "incremental.anchor holds them better)")
        if warnings_:
            row["warning"] = ";".join(warnings_)
        improved = self.best is None or val["val_score"] < self.best["val_score"]
        if improved:
            self.best = {"step": self.step, "val_score": val["val_score"], "val_distance": val["val_distance"]}
        if self.main:
            ckpt = self._checkpoint()
            save_checkpoint(self.run_dir / "last.pt", ckpt)
            if improved:
                save_checkpoint(self.run_dir / "best.pt", ckpt)
            self._say(f"step {self.step}: validation distance {val['val_distance']:.4f}{self._groups_text(val)} "
                      f"(recon {val['val_recon']:.4f}, train recon {train_recon:.4f}, KL {val['val_kl']:.2f} "
                      f"nats/frame: {' '.join(f'{v:.2f}' for v in val['kl_dims'])})"
                      + (" best" if improved else ""))
            if self.progress_bar is not None and self.lineage is not None:
                self.progress_bar.update(0, **{f"val_{g}": val[f"val_{g}_distance"] for g in ("old", "new")
                                               if f"val_{g}_distance" in val})
        return row

    def _old_rise(self) -> float | None:
        """How far the old files' validation distance now lies above where this grown run started
        (the old run's weights measured on today's crops at step 0), as a fraction; None where
        there is nothing to compare."""
        if self.lineage is None or not self.history or "val_old_distance" not in self.history[-1]:
            return None
        return self.history[-1]["val_old_distance"] / self.history[0]["val_old_distance"] - 1.0

    def _groups_text(self, val: dict[str, Any]) -> str:
        """`: old files X (+r % since the start), new files Y` for a grown run, empty otherwise."""
        parts = []
        if "val_old_distance" in val:
            rise = self._old_rise()
            parts.append(f"old files {val['val_old_distance']:.4f}"
                         + (f" ({rise:+.1%} since the start)" if rise is not None and self.step else ""))
        if "val_new_distance" in val:
            parts.append(f"new files {val['val_new_distance']:.4f}")
        return (": " + ", ".join(parts)) if parts else ""

    def _summary(self, status: int) -> None:
        if not self.main:
            return
        best = self.best or {}
        if self.diverged:
            self._say(f"error: training diverged at step {self.step}: the loss or its gradient was not finite for "
                      f"{self.skip_streak} steps in a row, and none of them was applied. best.pt keeps step "
                      f"{best.get('step')} (validation distance {best.get('val_distance', float('nan')):.4f}). "
                      f"Train again with a lower [optim] lr (it is {self.cfg.optim.lr:g})")
            return
        if status:
            self._say(f"stopped by signal at step {self.step}; saved {self.run_dir / 'last.pt'} "
                      f"(continue with --resume)")
            return
        if self.skipped_steps or self.disc_skipped:
            self._say(f"warning: {self.skipped_steps} step{'' if self.skipped_steps == 1 else 's'} (and "
                      f"{self.disc_skipped} of the discriminators') skipped: the loss or its gradient was not finite "
                      "(a lower [optim] lr would avoid them)")
        self._say(f"done: {self.step} steps in {self.elapsed / 60:.1f} min; best validation distance "
                  f"{best.get('val_distance', float('nan')):.4f} at step {best.get('step')}; "
                  f"saved {self.run_dir / 'best.pt'} and {self.run_dir / 'last.pt'}")
        if self.lineage is not None and self.history:
            start, end = self.history[0], self.history[-1]
            for group, what in (("old", "the old run's"), ("new", "the added")):
                key = f"val_{group}_distance"
                if key in end:
                    self._say(f"held-out files, {what}: distance {start[key]:.4f} at the start, {end[key]:.4f} "
                              f"now ({end[key] / start[key] - 1:+.1%})")
        report_collapse(self.run_dir, self.cfg)


def finite_step(optimizer: torch.optim.Optimizer, parameters, clip: float) -> bool:
    """Clip the gradients of `parameters` to norm `clip` (0: no clipping) and step `optimizer`,
    unless their norm is not finite: then the gradients are dropped and the weights and the
    optimiser's moments keep their values, so one blown-up batch cannot put a NaN in the model.
    Returns whether it stepped. Under DDP the gradients are averaged over the processes by now,
    so every process makes the same choice."""
    params = [p for p in parameters if p.grad is not None]
    if clip > 0:
        norm = nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params])
    if not bool(torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def band_limit(cfg) -> tuple[float, float]:
    """(top, taper) in Hz of the decoder's iSTFT band limit (training.spectral_ops.band_limit_mask)."""
    from training.spectral_ops import band_limit_top
    return band_limit_top(cfg.n_fft, cfg.sample_rate, cfg.max_frequency), cfg.band_taper_hz


def typical_condition(dataset) -> Tensor:
    """The pitch and voicing the analysis holds while it sweeps the latents, `(2,)`: the median
    pitch (MIDI) of the training files' voiced frames and the share of frames voiced."""
    from training.pitch import REST_PITCH, VOICED_THRESHOLD, PitchTracker, track_long

    tracker = None
    pitches, voicings = [], []
    for f in dataset.train_files:
        condition = dataset.load_condition(f)
        if condition is None:  # a set prepared before pitch was tracked
            tracker = tracker or PitchTracker(dataset.sample_rate)
            condition = track_long(tracker, torch.from_numpy(dataset.load(f))).numpy()
        voiced = condition[1] > VOICED_THRESHOLD
        pitches.append(condition[0][voiced])
        voicings.append(voiced)
    pitch = np.concatenate(pitches) if pitches else np.zeros(0)
    voiced = np.concatenate(voicings) if voicings else np.zeros(0)
    return torch.tensor([float(np.median(pitch)) if pitch.size else REST_PITCH,
                         float(voiced.mean()) if voiced.size else 0.0])


def report_collapse(run_dir: Path, cfg: TrainConfig) -> list[int]:
    """Print the KL of every latent dimension (last log row) and name the collapsed ones."""
    with open(run_dir / "log.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("kl_0")]
    if not rows:
        return []
    kl = torch.tensor([float(rows[-1][f"kl_{i}"]) for i in range(cfg.model.latent_size)])
    dead = collapsed_dims(kl, cfg.kl.collapse_threshold)
    print("KL per latent dimension (nats/frame): " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(kl.tolist())),
          file=sys.stderr)
    if dead:
        print(f"collapsed latent dimensions (KL < {cfg.kl.collapse_threshold:g}): "
              + ", ".join(map(str, dead)) + f" — {len(dead)} of {len(kl)} carry no information",
              file=sys.stderr)
    else:
        print("no collapsed latent dimension", file=sys.stderr)
    return dead


def run(args: argparse.Namespace) -> int:
    from training.dataset import PreparedSetError

    # `kill -USR1 PID` prints where every thread of a training process is, without stopping it:
    # how a stalled run (a process waiting on the others at a collective) is diagnosed
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        trainer = Trainer(args)
    except (ConfigError, PreparedSetError, FileExistsError, FileNotFoundError, ValueError) as exc:
        # IncrementalError is a ValueError: a refused `--from` lands here with its reason
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = trainer.fit()
    if trainer.world > 1:
        # everything is written and the process group destroyed; what is left is freeing the DDP
        # wrapper, whose reducer holds the group: its destructor joins gloo's worker threads while
        # holding the interpreter's lock, and a worker still releasing the last collective's tensors
        # waits for that lock (torch 2.13: 4 hangs in 22 two-process runs on a loaded host).
        # Nothing needs those destructors, so the process leaves without them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
