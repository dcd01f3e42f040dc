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

import json
import math
import os
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

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

from mmbalance import diagnostics, memo, memory, records
from mmbalance.cache import to_device, wrap_loader
from mmbalance.config import assemble, config_hash
from mmbalance.data import BatchView, DatasetPlugin, RowPlan, Splits
from mmbalance.diagnostics import EvalView
from mmbalance.engine import stop
from mmbalance.engine.checkpoint import Checkpoints
from mmbalance.engine.heap import retain_freed_memory
from mmbalance.engine.record import RunRecord
from mmbalance.engine.runtime import (
    _worker_init,
    epoch_seed,
    limit_cpu_threads,
    resolve_amp,
    resolve_device,
    seed_everything,
)
from mmbalance.engine.services import Services
from mmbalance.errors import ConfigError, MMBalanceError, TrainingDiverged, did_you_mean
from mmbalance.method import PER_MODALITY_SOURCES, EstimationCost, Method, Phase, Prediction
from mmbalance.metrics import classification_metrics, final_metrics
from mmbalance.model import (
    MultimodalModel,
    build_encoder,
    check_backbone_options,
    random_init_warning,
    weights_record,
)
from mmbalance.show import plural


class RandomInitWarning(UserWarning):
    """An encoder the papers start from pretrained weights starts from random ones here."""


class Trainer(Services, Checkpoints, RunRecord):
    """Trains one cell (method x dataset x config) and writes its run record."""

    def __init__(self, cfg: Mapping[str, Any], dataset: DatasetPlugin, method: Method) -> None:
        self.cfg = dict(cfg)
        self.dataset = dataset
        self.method = method
        self.device = resolve_device(self.cfg["device"])
        self.data_fingerprint = dataset.data_fingerprint(self.cfg)
        self.hash = config_hash(self.cfg, data=self.data_fingerprint)
        self.run_dir = Path(self.cfg["records"]) / records.run_dir_name(self.cfg, self.hash)
        self.amp_dtype = resolve_amp(self.cfg["amp"], self.device)
        self._step_logs: dict[str, list[Any]] = {}
        self.optimizer_steps = 0
        self.estimation_cost = EstimationCost()  # the method's work outside the main loop
        self.extra_batches = 0  # batches of the method's own passes (iterate), all epochs
        self._estimating = False  # inside Services.estimation(): passes charged as estimation
        self.val_is_test = False
        self._heldout: Dataset | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self._phase_keys: set[str] = set()  # optimizers created by phases (not configured)
        self._pending_optimizer_states: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.outcome = ""  # after fit(): TRAINED, RESUMED or FINISHED_BEFORE
        self.cpu_allocation: dict[str, Any] = {}  # after setup(): threads used, CPUs available and why
        self.heap: dict[str, Any] = {}  # after setup(): how malloc keeps freed memory
        self.splits: Splits | None = None
        self.model: MultimodalModel | None = None
        # called with each epoch's entry once it is recorded and checkpointed (a tuner reports
        # the validation accuracy there; an exception it raises stops the run, left resumable)
        self.epoch_callbacks: list[Callable[[dict[str, Any]], None]] = []

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
        used = self.method.check_modalities(list(requested))
        self._check_backbone_keys(available, used)
        return used

    def _check_backbone_keys(self, available: list[str], used: list[str]) -> None:
        """Every ``backbone.<m>.*`` the user set (not the plugins' own table) names a modality
        this run trains, and options its backbone takes: one for a modality the dataset lacks
        or the run leaves out would be silently ignored, yet split the run's identity."""
        cfg = self.cfg
        plugins = assemble(type(self.dataset), type(self.method), None, {"protocol": cfg["protocol"]})["backbone"]
        for mod, entry in (cfg.get("backbone") or {}).items():
            if entry == plugins.get(mod):
                continue
            if mod not in available:
                raise ConfigError(
                    f"Setting backbone.{mod}.* names modality '{mod}', which dataset "
                    f"'{cfg['dataset']}' does not have (it has {', '.join(available)})."
                    f"{did_you_mean(mod, available)} Fix the key, e.g. --set backbone.{available[0]}.weights=PATH."
                )
            if mod not in used:
                raise ConfigError(
                    f"Setting backbone.{mod}.* configures modality '{mod}', which this run does not use "
                    f"(it trains {', '.join(used)}), so it would change nothing. Drop the setting, or "
                    f"train that modality too (--set modalities=...)."
                )
            if entry.get("name"):
                check_backbone_options(mod, str(entry["name"]), entry)

    def setup(self) -> None:
        cfg = self.cfg
        used = self.check()
        self.cpu_allocation = limit_cpu_threads()  # a Slurm task's CPUs, the affinity mask
        self.heap = retain_freed_memory()  # speed only: freed steps' memory kept (engine/heap.py)
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
        if self.val_is_test and not cfg["eval_test"]:
            raise ConfigError(
                "eval_test=false asks that this run never read the test split, but its validation split "
                "is the test split (val_fraction=0, the paper protocol, or a dataset without a validation "
                "split), so selecting on validation would read test. Set val_fraction > 0 (e.g. "
                "--set val_fraction=0.1) with the honest protocol.")
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


    def _limited(self, loader: DataLoader, limit: int | None) -> Iterator[tuple[int, Any]]:
        """At most ``limit`` batches; each batch boundary is where a stop request (SIGTERM,
        pre-emption) takes effect (mmbalance.engine.stop)."""
        for i, batch in enumerate(loader):
            stop.check()
            if limit is not None and i >= limit:
                break
            yield i, batch

    def _progress(self, it: Any, total: int, desc: str) -> Any:
        mode = self.cfg["progress"]
        if mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
            return it
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)


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
            raise TrainingDiverged(
                f"Training diverged in epoch {epoch + 1}: the mean training loss is {train_loss}. "
                f"Lower the learning rate (--set lr=...) or enable gradient clipping "
                f"(--set grad_clip=1.0).", epoch + 1)
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
        data = self.splits.train if phase.rows is None else RowPlan(self.splits.train, phase.rows)
        loader = self.loader(data, train=True, epoch=epoch, seed=order)
        if phase.rows is not None:  # a resampled pass has its own length
            limit = self.cfg["limit_train_batches"]
            total = min(len(loader), limit) if limit else len(loader)
            method.num_training_batches = total
        loss_sum = torch.zeros((), device=self.device)
        n = 0
        desc = f"epoch {epoch + 1}/{self.cfg['epochs']}" + (f" {phase.name}" if phase.name != "train" else "")
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


    def eval_view(self) -> EvalView:
        """What the imbalance diagnostics need of this run: the model, its modalities, the
        method's ``predict`` and ordered batches of a split on the device (no trainer)."""
        assert self.model is not None and self.splits is not None
        splits = self.splits

        def batches(split: str, limit: int | None) -> Iterator[Any]:
            for _, batch in self._limited(self.loader(getattr(splits, split), train=False), limit):
                yield to_device(batch, self.device)

        return EvalView(
            model=self.model, modalities=list(self.modalities), predict=self.method.predict,
            method_name=self.method.name, batches=batches, autocast=self.autocast,
            num_classes=splits.num_classes, train_limit=self.cfg.get("limit_train_batches"),
            eval_limit=self.cfg.get("limit_eval_batches"),
        )

    def epoch_line(self, entry: Mapping[str, Any]) -> str:
        """One persistent line per epoch: how training goes, readable in a log file too."""
        parts = [f"epoch {entry['epoch'] + 1}/{self.cfg['epochs']}", f"loss {entry['train_loss']:.4f}"]
        if entry.get("val") is not None:
            parts.append(f"val {entry['val']['fused']['acc']:.2f}")
            test = entry.get("test") or {}  # none when eval_test=false
            if test:
                parts.append(f"test {test['fused']['acc']:.2f}")
            per = [f"{m} {test[m]['acc']:.1f}" for m in self.modalities if m in test]
            if per:
                parts.append("[" + " ".join(per) + "]")
        else:
            parts.append("(not evaluated: mid-stage)")
        key = key_diagnostic(self.method.key_diagnostic, entry.get("diagnostics") or {})
        if key is not None:
            parts.append(f"{key[0]} {key[1]:.3g}")
        parts.append(f"{entry['train_time_s']:.1f} s")
        return "  ".join(parts)


    # ---- entry point ----------------------------------------------------------------------
    def fit(self, fresh: bool = False) -> dict[str, Any]:
        """Train (or resume, or skip if already done) and return the folded record.

        The run folder is locked for the whole run: a second identical command reports the
        running one instead of training into the same files. ``fresh`` discards an earlier
        record and checkpoint of this run (under the lock, so never a running one's).
        The data is built and the model set up before the run folder is created, so a
        configuration or data set that fails validation leaves no folder behind; a folder that
        is, or holds, a symbolic link is refused before anything is written into it.
        """
        if not fresh and records.is_done(self.run_dir):
            self.outcome = FINISHED_BEFORE
            return records.load_record(self.run_dir)
        holder = records.lock_holder(self.run_dir)  # fail fast, before building the data
        if holder is not None:
            raise records.RunLockedError(
                f"Run folder '{self.run_dir}' is already being trained by another process ({holder}). "
                f"Wait for it to finish, or stop it; two writers would corrupt the record."
            )
        self.setup()
        records.ensure_dir(self.run_dir)
        with records.RunLock(self.run_dir):
            records.check_run_folder(self.run_dir)
            if fresh:
                records.clear_run_dir(self.run_dir)
            elif records.is_done(self.run_dir):  # finished by another process meanwhile
                self.outcome = FINISHED_BEFORE
                return records.load_record(self.run_dir)
            records.clean_temp_files(self.run_dir)
            with stop.at_batch_boundaries():  # SIGTERM / pre-emption: at the next batch
                return self._fit_locked()


    def _fit_locked(self) -> dict[str, Any]:
        records.write_config(self.run_dir / "config.yaml", self.cfg)
        header = self._header()
        start = self._load_checkpoint() if self.cfg["checkpoint"] else 0
        self.outcome = RESUMED if start else TRAINED
        if start:
            header["resumed_from_epoch"] = start
            if self.cfg["log_epochs"]:
                print(resume_line(start, self.cfg["epochs"], self.run_dir), flush=True)
        header["segments"] = self._segments(start)
        self.method.resumed = start > 0
        if not start:
            self.method.on_cell_start()
        self.method.on_fit_start()
        wandb_run = self._wandb_init() if self.cfg["wandb"] else None
        self._checkpoint_saved_at = time.monotonic()  # checkpoint_every_s counts from here
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
            test = self.evaluate(self.splits.test) if evaluated and self.cfg["eval_test"] else None
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
            if self._checkpoint_due(epoch):  # the record's epoch lines follow the checkpoints:
                if self.cfg["checkpoint"]:  # a resume rewrites them from the checkpoint's history
                    self._save_checkpoint(epoch)
                self._write_record(header, None)
            if wandb_run is not None:
                wandb_run.log(_flatten({k: v for k, v in entry.items() if k != "epoch"}), step=epoch)
            for callback in self.epoch_callbacks:
                callback(entry)
        final = {
            "selection": final_metrics(self.history),
            "total_train_time_s": sum(e["train_time_s"] for e in self.history),
            "estimation_cost": self.estimation_cost.as_dict(),
        }
        if self.cfg["diagnostics"] and self.cfg["eval_test"]:  # they score the test split
            try:  # on the last epoch's model, before DONE
                diag = self._compute_diagnostics()
            except diagnostics.DiagnosticsError as exc:  # never lose a finished run to a diagnostic
                warnings.warn(f"{self.run_dir.name}: no imbalance diagnostics: {exc}", stacklevel=2)
                final["diagnostics_error"] = str(exc)
            else:
                diagnostics.write_diagnostics(self.run_dir, diag)
                final["diagnostics"] = {k: diag.get(k) for k in
                                        ("probe", "probe_baseline_acc", "shapley", "coalitions", "imbalance_degree")}
        self._write_record(header, final)
        records.atomic_write_text(self.run_dir / records.DONE, json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        if wandb_run is not None:
            wandb_run.summary.update(_flatten(final["selection"]))
            wandb_run.finish()
        return records.load_record(self.run_dir)

    def _compute_diagnostics(self) -> dict[str, Any]:
        """The imbalance diagnostics of the final model, announced by name (they take a while
        after the last epoch line) with a bar on a terminal, one line otherwise."""
        view = self.eval_view()
        announce = self.cfg["log_epochs"]
        if announce:
            print(diagnostics_line(self.modalities), end="" if not self._bar_on() else "\n", flush=True)
        t0 = time.perf_counter()
        bar = None
        if self._bar_on():
            from tqdm.auto import tqdm

            bar = tqdm(total=self._diagnostic_batches(), desc="diagnostics", unit="batch", leave=False,
                       dynamic_ncols=True)
            inner = view.batches

            def counted(split: str, limit: int | None) -> Iterator[Any]:
                for batch in inner(split, limit):
                    bar.update(1)
                    yield batch

            view.batches = counted
        try:
            diag = diagnostics.compute_diagnostics(view)
        finally:
            if bar is not None:
                bar.close()
        if announce:
            took = f"diagnostics done ({time.perf_counter() - t0:.1f} s)"
            print(took if self._bar_on() else f" done ({time.perf_counter() - t0:.1f} s)", flush=True)
        return diag

    def _bar_on(self) -> bool:
        mode = self.cfg["progress"]
        return mode == "on" or (mode == "auto" and sys.stderr.isatty())

    def _diagnostic_batches(self) -> int:
        """Batches the diagnostics draw: train and test once for the probes, test once per
        coalition of modalities for the Shapley values."""
        assert self.splits is not None

        def n(split: str, limit: int | None) -> int:
            size = len(self.loader(getattr(self.splits, split), train=False))
            return min(size, limit) if limit else size

        test = n("test", self.cfg["limit_eval_batches"])
        return n("train", self.cfg["limit_train_batches"]) + test * (1 + 2 ** len(self.modalities))

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




# how a fit() ended: what the command line says about it
TRAINED, RESUMED, FINISHED_BEFORE = "trained", "resumed", "finished before"


def resume_line(start: int, epochs: int, run_dir: Path) -> str:
    """What a resumed run says first (epochs counted from 1, as in the epoch lines)."""
    if start >= epochs:
        return (f"all {plural(epochs, 'epoch')} are in the checkpoint of {run_dir}; finishing the run "
                f"(diagnostics and record)")
    done = "epoch 1 is" if start == 1 else f"epochs 1-{start} are"
    return f"resuming from epoch {start + 1}/{epochs} ({done} in the checkpoint of {run_dir})"


def diagnostics_line(modalities: list[str]) -> str:
    """Names the work after the last epoch line, so the pause is not mistaken for a hang."""
    k = len(modalities)
    return (f"computing the imbalance diagnostics: a linear probe of each frozen encoder "
            f"({', '.join(modalities)}) and each modality's Shapley value ({2 ** k} coalitions); "
            f"--set diagnostics=false skips them ...")


def key_diagnostic(name: str | None, means: Mapping[str, float]) -> tuple[str, float] | None:
    """The method's key diagnostic among an epoch's means: the exact name, else the first
    diagnostic starting with it (a prefix such as IPRM's "omega_")."""
    if not name:
        return None
    if name in means:
        return name, means[name]
    for k, v in means.items():
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
