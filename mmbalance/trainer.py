"""The training loop. It owns everything a method should not have to write again.

Epochs, data loading, device placement, bf16 autocast on CUDA, optimizer and scheduler
stepping, evaluation on val and test every epoch, seeds, timing, peak memory, checkpoints and
resume, progress bar and optional wandb logging. Methods plug in through the hooks of
:class:`mmbalance.method.Method`.

Reproducibility: the global RNGs and the data-loader shuffle are re-seeded at the start of every
epoch from (seed, epoch). A run resumed from the checkpoint of epoch k therefore draws exactly
what an uninterrupted run draws in epoch k + 1, and its final record is identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    default_collate,
)

from mmbalance import memo, memory, records
from mmbalance.cache import to_device, wrap_loader  # to_device: re-exported for methods
from mmbalance.config import config_hash
from mmbalance.data import (
    BatchView,
    DatasetPlugin,
    Splits,
    random_holdout,
    stratified_holdout,
    subset,
)
from mmbalance.errors import ConfigError, MMBalanceError, did_you_mean
from mmbalance.method import PER_MODALITY_SOURCES, EstimationCost, Method, Phase, Prediction
from mmbalance.metrics import classification_metrics, final_metrics
from mmbalance.model import MultimodalModel, build_encoder, random_init_warning, weights_record


class RandomInitWarning(UserWarning):
    """An encoder the papers start from pretrained weights starts from random ones here."""


HELDOUT_SEED = 1234  # the held-out slice of train is the same for every seed of a grid


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> first CUDA device if there is one, else CPU; CUDA asked for but absent -> error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"Bad device '{spec}': use auto, cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Device '{spec}' was asked for, but PyTorch sees no CUDA device on this machine. "
                f"Use --device cpu (or auto)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"Device '{spec}' does not exist: this machine has {torch.cuda.device_count()} "
                f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
    elif dev.type != "cpu":
        raise ConfigError(f"Unsupported device '{spec}': use auto, cpu, cuda or cuda:N.")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    base = info.seed if info is not None else worker_id
    np.random.seed(base % (2**32))
    random.seed(base)


class Trainer:
    """Trains one cell (method x dataset x config) and writes its run record."""

    def __init__(self, cfg: Mapping[str, Any], dataset: DatasetPlugin, method: Method) -> None:
        self.cfg = dict(cfg)
        self.dataset = dataset
        self.method = method
        self.device = resolve_device(self.cfg["device"])
        self.data_fingerprint = dataset.data_fingerprint(self.cfg)
        self.hash = config_hash(self.cfg, data=self.data_fingerprint)
        self.run_dir = Path(self.cfg["records"]) / records.run_dir_name(self.cfg, self.hash)
        amp = self.cfg["amp"]
        self.amp_dtype = (
            torch.bfloat16 if (amp == "bf16" or (amp == "auto" and self.device.type == "cuda")) else None
        )
        self._step_logs: dict[str, list[Any]] = {}
        self.optimizer_steps = 0
        self.estimation_cost = EstimationCost()  # the method's work outside the main loop
        self.extra_batches = 0  # batches of the method's own passes (iterate), all epochs
        self.val_is_test = False
        self._heldout: Dataset | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self._phase_keys: set[str] = set()  # optimizers created by phases (not configured)
        self._pending_optimizer_states: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.splits: Splits | None = None
        self.model: MultimodalModel | None = None

    # ---- set-up ---------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Validate what needs the dataset but not its data: the requested modalities, the
        method's support for them, and that every ``backbone.<m>`` key names a modality the
        dataset has. Returns the modalities the run trains on. Cheap, so a grid checks every
        cell before it trains any."""
        cfg = self.cfg
        available = self.dataset.available_modalities(cfg)
        requested = cfg.get("modalities") or self.dataset.default_modalities(cfg)
        unknown = [m for m in requested if m not in available]
        if unknown:
            raise ConfigError(
                f"Dataset '{cfg['dataset']}' has no modality {', '.join(unknown)}; it has "
                f"{', '.join(available)}. Fix --set modalities=..."
            )
        defaults = {**(type(self.dataset).defaults.get("backbone") or {}),
                    **(type(self.method).defaults.get("backbone") or {})}
        for mod, entry in (cfg.get("backbone") or {}).items():
            default = defaults.get(mod)
            as_default = default is not None and entry == (default if isinstance(default, Mapping) else {"name": default})
            if mod not in available and not as_default:  # a user's key, not a plugin's table
                raise ConfigError(
                    f"Setting backbone.{mod}.* names modality '{mod}', which dataset "
                    f"'{cfg['dataset']}' does not have (it has {', '.join(available)})."
                    f"{did_you_mean(mod, available)} Fix the key, e.g. --set backbone.{available[0]}.weights=PATH."
                )
        return self.method.check_modalities(list(requested))

    def setup(self) -> None:
        cfg = self.cfg
        used = self.check()
        seed_everything(cfg["seed"])
        if self.dataset.pure_build:  # a grid worker builds in-memory data once
            self.splits = memo.reuse_splits(self.dataset.build, type(self.dataset).__qualname__,
                                            cfg, used, self.data_fingerprint)
        else:
            self.splits = self.dataset.build(cfg, used)
        for m in used:
            if m not in self.splits.modalities:
                raise MMBalanceError(f"dataset {cfg['dataset']} did not build modality {m}")
        seed_everything(cfg["seed"])  # model init independent of how much RNG the data used
        encoders = {
            m: build_encoder(m, self.splits.modalities[m], cfg["backbone"], cfg["embed_dim"])
            for m in used
        }
        dims = {m: e.out_dim for m, e in encoders.items()}
        fusion = self.method.build_fusion(dims, self.splits.num_classes)
        model = MultimodalModel(encoders, self.splits.num_classes, fusion)
        self.modalities = used
        self.val_is_test = bool(self.splits.info.get("val_is_test", False))
        if self.method.heldout_fraction:
            self._carve_heldout(self.method.heldout_fraction)
        self.method.trainer = self
        self.method.model = model
        self.method.configure_model(model)
        self.model = model.to(self.device)
        if cfg["memory_format"] == "channels_last":  # conv weights NHWC; activations follow
            self.model = self.model.to(memory_format=torch.channels_last)
        self.weights = weights_record(cfg["backbone"], used)
        for m, enc in encoders.items():  # what a name-mapped checkpoint left unused or missing
            report = getattr(enc, "weights_report", None)
            if report is not None and hasattr(report, "as_dict"):
                self.weights[m]["load"] = report.as_dict()
        warning = random_init_warning(self.weights)
        if warning:
            warnings.warn(warning, RandomInitWarning, stacklevel=2)
        self._set_optimizers(self.method.configure_optimizers())
        self._check_per_modality_source()

    def _set_optimizers(self, configured: Any) -> None:
        """Accept (opt, sched) or {name: (opt, sched)}; "main" (or the only one) is the
        optimizer of automatic optimisation."""
        if isinstance(configured, Mapping):
            pairs = {str(k): (v if isinstance(v, tuple) else (v, None)) for k, v in configured.items()}
        else:
            opt, sched = configured if isinstance(configured, tuple) else (configured, None)
            pairs = {"main": (opt, sched)}
        if "main" not in pairs:
            if len(pairs) != 1:
                raise MMBalanceError(
                    f"method {self.method.name}: configure_optimizers returned {sorted(pairs)}; "
                    f"name one of them 'main' (the optimizer of automatic optimisation)."
                )
            pairs = {"main": next(iter(pairs.values())), **pairs}
        self.optimizers = {k: o for k, (o, _) in pairs.items()}
        self.schedulers = {k: sch for k, (_, sch) in pairs.items() if sch is not None}
        self.optimizer = self.optimizers["main"]
        self.scheduler = self.schedulers.get("main")
        self.method.optimizer = self.optimizer
        self.method.optimizers = self.optimizers

    def _check_per_modality_source(self) -> None:
        """Per-modality numbers must come from something trained."""
        m = self.method
        source = m.per_modality_source()
        if source not in PER_MODALITY_SOURCES:
            raise MMBalanceError(f"method {m.name}: per_modality_source() returned {source!r}; "
                                 f"expected one of {PER_MODALITY_SOURCES}.")
        if source == "unimodal_heads" and not m.trains_unimodal_heads():
            raise MMBalanceError(
                f"method {m.name} reports per-modality accuracy from unimodal heads it does not "
                f"train; declare trains_unimodal_heads() or another per_modality_source()."
            )
        if source == "fused_parts" and not hasattr(self.model.fusion, "parts"):
            raise MMBalanceError(f"method {m.name}: its fused head has no per-modality parts.")
        if source == "method" and type(m).predict is Method.predict:
            raise MMBalanceError(f"method {m.name} declares its own per-modality rule but keeps the default predict().")

    def default_optimizers(self, params: Any) -> tuple[torch.optim.Optimizer, Any]:
        """The dataset recipe: SGD/Adam/AdamW with lr, momentum, weight decay, and a schedule."""
        cfg = self.cfg
        params = list(params) if not isinstance(params, list) else params
        if cfg["optimizer"] == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
            )
        elif cfg["optimizer"] == "adam":
            opt = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        else:
            opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        return opt, self.make_scheduler(opt)

    def make_scheduler(self, opt: torch.optim.Optimizer) -> Any:
        cfg = self.cfg
        if cfg["scheduler"] == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg["step_size"], gamma=cfg["gamma"])
        if cfg["scheduler"] == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg["epochs"]))
        return None

    # ---- data -----------------------------------------------------------------------------
    def loader(
        self, ds: Dataset, train: bool, epoch: int = 0, seed: int | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """Shuffled (train) or ordered loader; the shuffle is seeded from (seed, epoch)."""
        cfg = self.cfg
        gen = torch.Generator()
        gen.manual_seed(epoch_seed(cfg["seed"], epoch) if seed is None else seed)
        bs = batch_size or (cfg["batch_size"] if train else (cfg["eval_batch_size"] or 2 * cfg["batch_size"]))
        workers = cfg["num_workers"]
        if workers is None:  # auto: in-memory data needs none; files are decoded in parallel
            workers = 0 if hasattr(ds, "get_batch") else min(8, os.cpu_count() or 1)
        common = {
            "num_workers": workers,
            "worker_init_fn": _worker_init if workers else None,
            "pin_memory": self.device.type == "cuda",
            "generator": gen,
        }
        if hasattr(ds, "get_batch"):  # in-memory data: fetch whole batches at once
            order = RandomSampler(ds, generator=gen) if train else SequentialSampler(ds)
            sampler = BatchSampler(order, batch_size=bs, drop_last=False)
            return DataLoader(BatchView(ds), batch_size=None, sampler=sampler, **common)
        loader = DataLoader(ds, batch_size=bs, shuffle=train, drop_last=False, collate_fn=self._collate, **common)
        # a cached paper dataset crops on the device (CUDA): batches then arrive there already
        return wrap_loader(loader, self.splits, self.device)

    def _collate(self, items: Any) -> Any:
        assert self.splits is not None
        return (self.splits.collate or default_collate)(items)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _limited(self, loader: DataLoader, limit: int | None) -> Iterator[tuple[int, Any]]:
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            yield i, batch

    def _progress(self, it: Any, total: int, desc: str) -> Any:
        mode = self.cfg["progress"]
        if mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
            return it
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)

    # ---- services used by methods ---------------------------------------------------------
    def log_step(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().reshape(())
            self._step_logs.setdefault(k, []).append(v)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg["grad_clip"]:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1

    def split(self, name: str) -> Dataset:
        assert self.splits is not None
        if name == "heldout":
            return self.heldout()
        if name not in ("train", "val", "test"):
            raise MMBalanceError(f"unknown split '{name}': use train, val, test or heldout.")
        return getattr(self.splits, name)

    def iterate(
        self,
        split: str,
        *,
        batches: int | None = None,
        fraction: float | None = None,
        grad: bool = False,
        train_mode: bool = False,
        shuffle: bool | None = None,
        tag: str = "pass",
    ) -> Iterator[Mapping[str, Any]]:
        """Batches of ``split`` (on the device) outside the main loop.

        At most ``batches`` batches, or ``floor(fraction * n)`` (at least 1) of the n batches
        an epoch of that split has (for train: after ``limit_train_batches``). The order is
        seeded from (seed, epoch, tag), so it never disturbs the main loop's draws and a
        resumed run repeats it. ``train_mode`` runs the model in train mode (dropout, batch
        statistics), ``grad`` keeps autograd on; the model's mode is restored afterwards.
        Train-split passes use the training batch size and the training data pipeline.
        """
        assert self.model is not None
        ds = self.split(split)
        is_train = split in ("train", "heldout")
        order_seed = epoch_seed(self.cfg["seed"], self.method.epoch) ^ (zlib.crc32(tag.encode()) & 0xFFFF_FFFF)
        loader = self.loader(ds, train=is_train if shuffle is None else shuffle, epoch=0, seed=order_seed,
                             batch_size=self.cfg["batch_size"] if is_train else None)
        n = len(loader)
        if split == "train" and self.cfg["limit_train_batches"]:
            n = min(n, self.cfg["limit_train_batches"])
        if fraction is not None:
            n = min(n, max(1, math.floor(fraction * n)))
        if batches is not None:
            n = min(n, batches)
        was_training = self.model.training
        self.model.train(train_mode)
        try:
            with torch.set_grad_enabled(grad):
                for i, batch in enumerate(loader):
                    if i >= n:
                        break
                    self.extra_batches += 1
                    yield to_device(batch, self.device)
        finally:
            self.model.train(was_training)

    def heldout(self) -> Dataset:
        if self._heldout is None:
            raise MMBalanceError(
                f"method {self.method.name} asked for the held-out slice of train but declares "
                f"no heldout_fraction."
            )
        return self._heldout

    def _carve_heldout(self, fraction: float) -> None:
        """A slice of train, carved once per cell with a fixed seed (never the run seed) and
        separate from validation; the main loop trains on the rest."""
        assert self.splits is not None
        train = self.splits.train
        labels = getattr(train, "labels", None)
        labels = np.asarray(labels) if labels is not None else None
        try:
            if labels is None:
                raise ValueError("no labels")
            keep, hold = stratified_holdout(labels, fraction, seed=HELDOUT_SEED)
            how = "stratified"
        except ValueError:
            keep, hold = random_holdout(len(train), fraction, seed=HELDOUT_SEED)
            how = "random"
        self.splits.train = subset(train, keep)
        self._heldout = subset(train, hold)
        self.splits.info["heldout_rule"] = (
            f"{how} {fraction:g} of train held out for method {self.method.name} (fixed seed "
            f"{HELDOUT_SEED}); {len(keep)} train / {len(hold)} held out"
        )

    def sub_train(
        self,
        model: torch.nn.Module,
        params: Any,
        loss_fn: Any,
        split: str,
        epochs: int,
        optimizer: torch.optim.Optimizer | None = None,
        tag: str = "sub",
    ) -> EstimationCost:
        """Train ``params`` of ``model`` (a copy of the run's model, or some of its heads)
        for ``epochs`` on ``split`` with ``loss_fn(model, batch)``. Parameters outside
        ``params`` are frozen for the duration. The optimizer defaults to the dataset recipe
        at the run's base learning rate. Its steps and wall time are the method's estimation
        cost, recorded apart from the main run's."""
        params = list(params)
        wanted = {id(p) for p in params}
        frozen = [(p, p.requires_grad) for p in model.parameters() if id(p) not in wanted]
        for p, _ in frozen:
            p.requires_grad_(False)
        opt = optimizer if optimizer is not None else self.default_optimizers(params)[0]
        cost = EstimationCost()
        t0 = time.perf_counter()
        try:
            for e in range(epochs):
                was = model.training
                model.train()
                loader = self.loader(self.split(split), train=True, epoch=0,
                                     seed=epoch_seed(self.cfg["seed"], self.method.epoch * 1009 + e) ^ zlib.crc32(tag.encode()))
                limit = self.cfg["limit_train_batches"]
                for i, batch in enumerate(loader):
                    if limit and i >= limit:
                        break
                    batch = to_device(batch, self.device)
                    opt.zero_grad(set_to_none=True)
                    with self.autocast():
                        loss = loss_fn(model, batch)
                    loss.float().backward()
                    if self.cfg["grad_clip"]:
                        torch.nn.utils.clip_grad_norm_(params, self.cfg["grad_clip"])
                    opt.step()
                    cost.optimizer_steps += 1
                    cost.batches += 1
                model.train(was)
        finally:
            for p, req in frozen:
                p.requires_grad_(req)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        cost.time_s = time.perf_counter() - t0
        self.estimation_cost.add(cost)
        return cost

    def set_lr_scale(self, optimizer: torch.optim.Optimizer, group: int | str, scale: float) -> None:
        """Set one param group's learning rate to (its scheduled rate) x ``scale``.

        The scale is stored in the group ("lr_scale", so it is checkpointed with the
        optimizer) and re-applied after every scheduler step: it composes with StepLR or
        cosine instead of being overwritten, and it never compounds.
        """
        g = self._group(optimizer, group)
        old = float(g.get("lr_scale", 1.0))
        g["lr"] = g["lr"] / old * float(scale)
        g["lr_scale"] = float(scale)

    @staticmethod
    def _group(optimizer: torch.optim.Optimizer, group: int | str) -> dict[str, Any]:
        if isinstance(group, int):
            return optimizer.param_groups[group]
        for g in optimizer.param_groups:
            if g.get("name") == group:
                return g
        names = [g.get("name") for g in optimizer.param_groups]
        raise MMBalanceError(f"no param group named '{group}' (groups: {names}).")

    def _step_schedulers(self) -> None:
        """Step every scheduler on the unscaled rates, then put each group's scale back."""
        for name, sched in self.schedulers.items():
            groups = self.optimizers[name].param_groups
            scales = [float(g.get("lr_scale", 1.0)) for g in groups]
            for g, sc in zip(groups, scales, strict=True):
                g["lr"] = g["lr"] / sc
            with warnings.catch_warnings():  # an optimizer a phase plan left idle this epoch
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                sched.step()
            for g, sc in zip(groups, scales, strict=True):
                g["lr"] = g["lr"] * sc

    def learning_rates(self) -> dict[str, float]:
        """Every param group's learning rate, as '<optimizer>/<group name or index>'."""
        return {
            f"{name}/{g.get('name', i)}": float(g["lr"])
            for name, opt in self.optimizers.items()
            for i, g in enumerate(opt.param_groups)
        }

    # ---- the loop -------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch: the method's phases (default: one joint pass over train)."""
        assert self.model is not None and self.splits is not None
        method, model = self.method, self.model
        seed_everything(epoch_seed(self.cfg["seed"], epoch))
        limit = self.cfg["limit_train_batches"]
        n_loader = len(self.loader(self.splits.train, train=True, epoch=epoch))
        total = min(n_loader, limit) if limit else n_loader
        model.train()
        method.epoch = epoch
        method.num_training_batches = total
        self._step_logs = {}  # before the epoch hook, so what it logs is kept
        method.on_train_epoch_start(epoch)
        plan = method.epoch_plan(epoch) or [Phase()]
        self._retire_phase_optimizers(plan)
        for phase in plan:
            self._phase_optimizer(phase)  # create (or restore) them before recording the rates
        lrs = self.learning_rates()  # the rates this epoch trains at
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        n_batches = 0
        phases: list[dict[str, Any]] = []
        for k, phase in enumerate(plan):
            for p in range(phase.passes):
                # the default single pass draws exactly what the plain loop always drew
                order = None if (k, p) == (0, 0) else epoch_seed(self.cfg["seed"], epoch) ^ zlib.crc32(f"{phase.name}/{p}".encode())
                t0, steps0 = time.perf_counter(), self.optimizer_steps
                s, n = self._run_phase(phase, epoch, order, total)
                loss_sum += s
                n_batches += n
                phases.append({"phase": phase.name, "pass": p, "batches": n,
                               "optimizer_steps": self.optimizer_steps - steps0, "time_s": time.perf_counter() - t0})
        method.on_train_epoch_end(epoch)
        self._step_schedulers()
        train_loss = (loss_sum / max(1, n_batches)).item()
        if not math.isfinite(train_loss):
            raise MMBalanceError(
                f"Training diverged in epoch {epoch}: the mean training loss is {train_loss}. "
                f"Lower the learning rate (--set lr=...) or enable gradient clipping "
                f"(--set grad_clip=1.0)."
            )
        out: dict[str, Any] = {"train_loss": train_loss, "train_batches": n_batches,
                               "data_passes": n_batches / max(1, total), "lrs": lrs}
        if len(phases) > 1 or plan[0].name != "train":
            out["phases"] = phases
        return out

    def _run_phase(self, phase: Phase, epoch: int, order: int | None, total: int) -> tuple[torch.Tensor, int]:
        """One pass of a phase over train: its parameter subset, step function and optimizer."""
        method, model = self.method, self.model
        assert model is not None and self.splits is not None
        manual = method.manual_optimization if phase.manual is None else phase.manual
        step = phase.step or method.training_step
        optimizer = self._phase_optimizer(phase)
        frozen = self._freeze_outside(phase.params)
        bar_every = 25  # batches between running-loss updates of a progress bar (one sync each)
        loader = self.loader(self.splits.train, train=True, epoch=epoch, seed=order)
        loss_sum = torch.zeros((), device=self.device)
        n = 0
        desc = f"epoch {epoch}" + (f" {phase.name}" if phase.name != "train" else "")
        try:
            method.phase = phase
            method.phase_optimizer = optimizer
            bar = self._progress(self._limited(loader, total), total, desc)
            for i, batch in bar:
                batch = to_device(batch, self.device)
                if manual:
                    loss = step(batch, i)  # it wraps its forward passes in autocast
                else:
                    optimizer.zero_grad(set_to_none=True)
                    with self.autocast():
                        loss = step(batch, i)
                    if loss is None:
                        raise RuntimeError(
                            f"method {method.name}: training_step returned no loss in automatic mode"
                        )
                    loss.backward()
                    method.on_after_backward()
                    self.optimizer_step(optimizer)
                if loss is not None:
                    loss_sum += loss.detach().float()
                n += 1
                method.global_step += 1
                if hasattr(bar, "set_postfix") and n % bar_every == 0:  # terminals only
                    bar.set_postfix(loss=f"{(loss_sum / n).item():.4f}", refresh=False)
        finally:
            for p, req in frozen:
                p.requires_grad_(req)
        return loss_sum, n

    def _freeze_outside(self, params: Any) -> list[tuple[torch.nn.Parameter, bool]]:
        """Freeze every model parameter outside ``params`` (None = train all); returns what to
        restore."""
        if params is None:
            return []
        keep = {id(p) for p in params}
        frozen = [(p, p.requires_grad) for p in self.model.parameters() if id(p) not in keep]
        for p, _ in frozen:
            p.requires_grad_(False)
        return frozen

    def _phase_optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        """The optimizer a phase steps: a configured one by name, or one the phase creates
        (``make_optimizer``) the first time its key is used; created ones are checkpointed
        and restored on resume, and retired when no phase of an epoch names them."""
        key = phase.optimizer
        if key in self.optimizers:
            return self.optimizers[key]
        if phase.make_optimizer is None:
            raise MMBalanceError(
                f"method {self.method.name}: phase '{phase.name}' names optimizer '{key}', which "
                f"does not exist; give the phase a make_optimizer or configure it."
            )
        params = list(phase.params) if phase.params is not None else list(self.model.parameters())
        opt = phase.make_optimizer(params)
        pending = self._pending_optimizer_states.pop(key, None)
        if pending is not None:
            opt.load_state_dict(pending)
        self.optimizers[key] = opt
        self._phase_keys.add(key)
        self.method.optimizers = self.optimizers
        return opt

    def _retire_phase_optimizers(self, plan: list[Phase]) -> None:
        wanted = {ph.optimizer for ph in plan}
        for key in list(self._phase_keys - wanted):
            self.optimizers.pop(key, None)
            self._phase_keys.discard(key)

    @torch.no_grad()
    def evaluate(self, ds: Dataset) -> dict[str, Any]:
        assert self.model is not None and self.splits is not None
        self.model.eval()
        fused, labels = [], []
        per: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        limit = self.cfg["limit_eval_batches"]
        for _, batch in self._limited(self.loader(ds, train=False), limit):
            batch = to_device(batch, self.device)
            with self.autocast():
                pred: Prediction = self.method.predict(batch)
            fused.append(pred.fused.float())  # stays on the device: one copy per split, not per batch
            for m, logits in pred.per_modality.items():
                per.setdefault(m, []).append(logits.float())
            labels.append(batch["label"])
        y = torch.cat(labels).cpu()
        k = self.splits.num_classes
        logits = torch.cat(fused).cpu()
        out: dict[str, Any] = {
            "fused": classification_metrics(logits, y, k),
            "loss": float(F.cross_entropy(logits, y)),
            "n": len(y),
        }
        for m, chunks in per.items():
            if chunks:
                out[m] = classification_metrics(torch.cat(chunks).cpu(), y, k)
        return out

    def _diagnostics(self, epoch: int) -> dict[str, float]:
        """Write this epoch's per-step diagnostics and return their epoch means."""
        if not self._step_logs:
            return {}
        cols = {
            k: _column(vals)
            for k, vals in self._step_logs.items()
        }  # one device-to-host copy per diagnostic per epoch
        n = max(len(v) for v in cols.values())
        rows = [{k: (v[i] if i < len(v) else None) for k, v in cols.items()} | {"step": i} for i in range(n)]
        records.write_jsonl(self.run_dir / "diagnostics" / f"epoch_{epoch:04d}.jsonl", rows)
        return {k: float(np.nanmean(v)) for k, v in cols.items()}

    def epoch_line(self, entry: Mapping[str, Any]) -> str:
        """One persistent line per epoch: how training goes, readable in a log file too."""
        parts = [f"epoch {entry['epoch'] + 1}/{self.cfg['epochs']}", f"loss {entry['train_loss']:.4f}"]
        if entry.get("val") is not None:
            parts.append(f"val {entry['val']['fused']['acc']:.2f}")
            parts.append(f"test {entry['test']['fused']['acc']:.2f}")
            per = [f"{m} {entry['test'][m]['acc']:.1f}" for m in self.modalities if m in entry["test"]]
            if per:
                parts.append("[" + " ".join(per) + "]")
        else:
            parts.append("(not evaluated: mid-stage)")
        key = key_diagnostic(self.method.key_diagnostic, entry.get("diagnostics") or {})
        if key is not None:
            parts.append(f"{key[0]} {key[1]:.3g}")
        parts.append(f"{entry['train_time_s']:.1f} s")
        return "  ".join(parts)

    # ---- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int) -> None:
        assert self.model is not None
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "phase_optimizers": sorted(self._phase_keys),
            "schedulers": {k: sch.state_dict() for k, sch in self.schedulers.items()},
            "estimation_cost": self.estimation_cost.as_dict(),
            "extra_batches": self.extra_batches,
            "method": self.method.state_dict(),
            "global_step": self.method.global_step,
            "optimizer_steps": self.optimizer_steps,
            "history": self.history,
            "config_hash": self.hash,
            "data_fingerprint": self.data_fingerprint,
        }
        records.atomic_torch_save(state, self.run_dir / records.CHECKPOINT)

    def _load_checkpoint(self) -> int:
        """Restore the last finished epoch; returns the next epoch to run (0 if none).

        The file is read with ``weights_only=True``: a pickle planted in a shared run folder
        cannot execute. A checkpoint of another configuration or other data is refused.
        """
        path = self.run_dir / records.CHECKPOINT
        if not path.exists():
            return 0
        assert self.model is not None
        state = records.load_checkpoint(path, self.device)
        for key, mine in (("config_hash", self.hash), ("data_fingerprint", self.data_fingerprint)):
            if key in state and state[key] != mine:
                raise records.RecordError(
                    f"The checkpoint '{path}' was written for other {'data' if key == 'data_fingerprint' else 'settings'} "
                    f"({key} {state[key]!r}, this run has {mine!r}); it will not be continued on "
                    f"these. Rerun with --fresh to start this run over."
                )
        try:
            return self._restore(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise records.RecordError(
                f"The checkpoint '{path}' does not fit this run ({type(exc).__name__}: {exc}). "
                f"Rerun with --fresh to start this run over."
            ) from exc

    def _restore(self, state: Mapping[str, Any]) -> int:
        assert self.model is not None
        self.model.load_state_dict(state["model"])
        saved = dict(state["optimizers"])
        phase_keys = set(state.get("phase_optimizers", []))
        if set(saved) - phase_keys != set(self.optimizers):
            raise ValueError(f"optimizers {sorted(set(saved) - phase_keys)} saved, {sorted(self.optimizers)} configured")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(saved[k])
        # a phase's optimizer is re-created by its phase, then given its saved state
        self._pending_optimizer_states = {k: saved[k] for k in phase_keys}
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        self.estimation_cost = EstimationCost(**state.get("estimation_cost", {}))
        self.extra_batches = int(state.get("extra_batches", 0))
        self.method.load_state_dict(state["method"])
        self.method.global_step = state["global_step"]
        self.optimizer_steps = state["optimizer_steps"]
        self.history = list(state["history"])
        return state["epoch"] + 1

    # ---- record ---------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        assert self.splits is not None
        dev = str(self.device)
        if self.device.type == "cuda":
            dev += f" ({torch.cuda.get_device_name(self.device)})"
        return {
            "type": "header",
            "config": self.cfg,
            "config_hash": self.hash,
            "method_label": self.method.label(),
            "method_info": {
                "per_modality": self.method.per_modality_source(),
                "trains_unimodal_heads": self.method.trains_unimodal_heads(),
                **self.method.record_info(),
            },
            "modalities": self.modalities,
            "dataset_info": {
                "num_classes": self.splits.num_classes,
                "class_names": self.splits.class_names,
                "sizes": {s: len(getattr(self.splits, s)) for s in ("train", "val", "test")},
                **self.splits.info,
            },
            "device": dev,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
            "cpu_threads": torch.get_num_threads(),  # float sums depend on it: same seed, same threads
            "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),  # speed only (mmbalance/__init__.py)
            "cpu_kernels": records.cpu_kernels(),  # AMX and AVX512-BF16 round bf16 sums differently
            "data_fingerprint": self.data_fingerprint,
            "weights": self.weights,  # per encoder: "random", or the path and its SHA-256
            "code_version": records.code_version(),
            "versions": records.library_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _write_record(self, header: dict[str, Any], final: dict[str, Any] | None) -> None:
        rows = [header] + [{"type": "epoch", **e} for e in self.history]
        if final is not None:
            rows.append({"type": "final", **final})
        records.write_jsonl(self.run_dir / records.RECORD, rows)

    # ---- entry point ----------------------------------------------------------------------
    def fit(self, fresh: bool = False) -> dict[str, Any]:
        """Train (or resume, or skip if already done) and return the folded record.

        The run folder is locked for the whole run: a second identical command reports the
        running one instead of training into the same files. ``fresh`` discards an earlier
        record and checkpoint of this run (under the lock, so never a running one's).
        """
        if not fresh and (self.run_dir / records.DONE).exists():
            return records.load_record(self.run_dir)
        records.ensure_dir(self.run_dir)
        with records.RunLock(self.run_dir):
            if fresh:
                records.clear_run_dir(self.run_dir)
            elif (self.run_dir / records.DONE).exists():  # finished by another process meanwhile
                return records.load_record(self.run_dir)
            records.clean_temp_files(self.run_dir)
            return self._fit_locked()

    def _segments(self, start: int) -> list[dict[str, Any]]:
        """One entry per process that trained this run (resumes included), with what makes
        float sums differ between them (threads, device)."""
        previous: list[dict[str, Any]] = []
        if start and (self.run_dir / records.RECORD).exists():
            old = records.load_record(self.run_dir)["header"]
            previous = list(old.get("segments") or [])
        return previous + [{
            "from_epoch": start,
            "cpu_threads": torch.get_num_threads(),
            "device": str(self.device),
            "cpu_kernels": records.cpu_kernels(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }]

    def _fit_locked(self) -> dict[str, Any]:
        self.setup()
        records.write_config(self.run_dir / "config.yaml", self.cfg)
        header = self._header()
        start = self._load_checkpoint() if self.cfg["checkpoint"] else 0
        if start:
            header["resumed_from_epoch"] = start
        header["segments"] = self._segments(start)
        self.method.resumed = start > 0
        if not start:
            self.method.on_cell_start()
        self.method.on_fit_start()
        wandb_run = self._wandb_init() if self.cfg["wandb"] else None
        for epoch in range(start, self.cfg["epochs"]):
            mem_kind = memory.reset_peak(self.device)
            steps_before = self.optimizer_steps
            cost_before = self.estimation_cost.as_dict()
            extra_before = self.extra_batches
            t0 = time.perf_counter()
            train = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            evaluated = self.method.should_evaluate(epoch) or epoch == self.cfg["epochs"] - 1
            val = self.evaluate(self.splits.val) if evaluated else None
            test = self.evaluate(self.splits.test) if evaluated else None
            t2 = time.perf_counter()
            if evaluated:
                self.method.on_validation_end({"val": val, "test": test, "epoch": epoch})
            entry = {
                "epoch": epoch,
                **train,
                "optimizer_steps": self.optimizer_steps - steps_before,
                "extra_batches": self.extra_batches - extra_before,  # the method's own data passes
                "lr": next(iter(train["lrs"].values())),
                "estimation_cost": {k: v - cost_before[k] for k, v in self.estimation_cost.as_dict().items()},
                # the method's sub-training (G-Blend) is its estimation cost, not epoch time
                "train_time_s": t1 - t0 - (self.estimation_cost.time_s - cost_before["time_s"]),
                "eval_time_s": t2 - t1,
                "peak_mem_mb": memory.peak_mb(self.device, mem_kind),  # of train and evaluation
                "peak_mem_kind": mem_kind,
                "diagnostics": self._diagnostics(epoch),
                "val": val,
                "test": test,
            }
            self.history.append(entry)
            if self.cfg["log_epochs"]:
                print(self.epoch_line(entry), flush=True)
            if self.cfg["checkpoint"]:
                self._save_checkpoint(epoch)
            self._write_record(header, None)
            if wandb_run is not None:
                wandb_run.log(_flatten({k: v for k, v in entry.items() if k != "epoch"}), step=epoch)
        final = {
            "selection": final_metrics(self.history),
            "total_train_time_s": sum(e["train_time_s"] for e in self.history),
            "estimation_cost": self.estimation_cost.as_dict(),
        }
        if self.cfg["diagnostics"]:
            from mmbalance.diagnostics import (
                DiagnosticsError,
                compute_diagnostics,
                write_diagnostics,
            )

            try:  # on the last epoch's model, before DONE
                diag = compute_diagnostics(self)
            except DiagnosticsError as exc:  # never lose a finished run to a diagnostic
                warnings.warn(f"{self.run_dir.name}: no imbalance diagnostics: {exc}", stacklevel=2)
                final["diagnostics_error"] = str(exc)
            else:
                write_diagnostics(self.run_dir, diag)
                final["diagnostics"] = {k: diag.get(k) for k in
                                        ("probe", "probe_baseline_acc", "shapley", "coalitions", "imbalance_degree")}
        self._write_record(header, final)
        records.atomic_write_text(self.run_dir / records.DONE, json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        if wandb_run is not None:
            wandb_run.summary.update(_flatten(final["selection"]))
            wandb_run.finish()
        return records.load_record(self.run_dir)

    def _wandb_init(self) -> Any:
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - wandb is a dependency
            raise ConfigError("wandb logging was asked for but wandb is not installed: pip install wandb.") from exc
        return wandb.init(
            project=self.cfg["wandb_project"],
            mode=self.cfg["wandb_mode"],
            dir=str(self.run_dir),
            name=self.run_dir.name,
            id=self.hash,
            resume="allow",
            config=self.cfg,
        )


def _column(vals: list[Any]) -> list[float]:
    """One diagnostic's per-step values as floats: plain floats stay on the host (no copy to
    the device and back), device tensors come over in one stacked copy."""
    if all(not isinstance(v, torch.Tensor) for v in vals):
        return torch.tensor([float(v) for v in vals], dtype=torch.float32).tolist()
    dev = next(v.device for v in vals if isinstance(v, torch.Tensor))
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dev) for v in vals]).cpu().tolist()


def key_diagnostic(name: str | None, diagnostics: Mapping[str, float]) -> tuple[str, float] | None:
    """The method's key diagnostic among an epoch's means: the exact name, else the first
    diagnostic starting with it (a prefix such as IPRM's "omega_")."""
    if not name:
        return None
    if name in diagnostics:
        return name, diagnostics[name]
    for k, v in diagnostics.items():
        if k.startswith(name):
            return k, v
    return None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, int | float) and v is not None:
            out[key] = v
    return out
