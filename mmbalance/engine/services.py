"""The services the loop offers methods (``self.trainer`` in a method): the narrow interface
of :class:`mmbalance.method.LoopServices`.

Optimizers and schedules from the dataset recipe, autocast, per-step logging, optimizer steps
with the run's gradient clipping, passes over a split outside the main loop (``iterate``), the
held-out slice of train, sub-training of a copy (``sub_train``, charged as estimation cost),
per-group learning-rate scales that compose with the schedule, and the optimizers a phase plan
creates. Each exists once, here; a method never reaches into the loop itself.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance import records
from mmbalance.cache import to_device
from mmbalance.data import RowPlan, eval_view, random_holdout, stratified_holdout, subset
from mmbalance.engine import stop
from mmbalance.engine.runtime import epoch_seed
from mmbalance.errors import MMBalanceError
from mmbalance.method import EstimationCost, Phase
from mmbalance.recorded import RecordedRun, find_recorded_run, identity_config

HELDOUT_SEED = 1234  # the held-out slice of train is the same for every seed of a grid


@dataclass
class SubTrainCost(EstimationCost):
    """What :meth:`Services.sub_train` returns: its estimation cost (only the three cost fields
    are recorded), plus, with ``select_on``, each sub-epoch's score and the epoch restored."""

    scores: list[float] = field(default_factory=list)
    best_epoch: int | None = None


class Services:
    """Mixed into :class:`mmbalance.engine.loop.Trainer`; uses its ``cfg``, ``model``,
    ``splits``, ``method``, ``device``, ``optimizers`` and counters."""

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

    def make_scheduler(self, opt: torch.optim.Optimizer, epochs: int | None = None) -> Any:
        """The recipe's schedule over ``epochs`` (default: the run's; a sub-training passes
        its own, so a cosine schedule anneals over the sub-training's length)."""
        cfg = self.cfg
        if cfg["scheduler"] == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg["step_size"], gamma=cfg["gamma"])
        if cfg["scheduler"] == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs or cfg["epochs"]))
        return None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

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
        if name == "test" and not self.cfg["eval_test"]:
            raise MMBalanceError(
                f"method {self.method.name} asked for a pass over the test split, but this run has "
                f"eval_test=false (a tuning trial): it must never read test. Read train, val or heldout.")
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
        rows: Sequence[int] | None = None,
        augment: bool | None = None,
    ) -> Iterator[Mapping[str, Any]]:
        """Batches of ``split`` (on the device) outside the main loop.

        At most ``batches`` batches, or ``floor(fraction * n)`` (at least 1) of the n batches
        an epoch of that split has (for train: after ``limit_train_batches``). The order is
        seeded from (seed, epoch, tag), so it never disturbs the main loop's draws and a
        resumed run repeats it. ``train_mode`` runs the model in train mode (dropout, batch
        statistics), ``grad`` keeps autograd on; the model's mode is restored afterwards.
        Train-split passes use the training batch size.

        ``rows``: only these positions of the split, in this order (duplicates allowed; each
        batch then carries ``row``, the position in ``rows``, and keeps ``index``, the position
        in the split). ``augment``: None = the split's own pipeline (train-time augmentation on
        train and heldout); False = the evaluation pipeline on any split (the same rows,
        deterministic crops and frames; :func:`mmbalance.data.eval_view`).
        Batches drawn inside :meth:`estimation` count as the method's estimation cost,
        the others as its extra batches.
        """
        assert self.model is not None
        ds = self.split(split)
        is_train = split in ("train", "heldout")
        if augment is False:
            ds = eval_view(ds)
        if rows is not None:
            ds = RowPlan(ds, rows)
        order_seed = epoch_seed(self.cfg["seed"], self.method.epoch) ^ (zlib.crc32(tag.encode()) & 0xFFFF_FFFF)
        shuffled = (is_train and rows is None) if shuffle is None else shuffle
        loader = self.loader(ds, train=shuffled, epoch=0, seed=order_seed,
                             batch_size=self.cfg["batch_size"] if is_train else None)
        n = len(loader)
        if split == "train" and rows is None and self.cfg["limit_train_batches"]:
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
                    stop.check()  # a batch boundary: where SIGTERM / pre-emption stops the run
                    if i >= n:
                        break
                    if self._estimating:
                        self.estimation_cost.batches += 1
                    else:
                        self.extra_batches += 1
                    yield to_device(batch, self.device)
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def estimation(self) -> Iterator[None]:
        """Charge the work inside the block to the method's estimation cost: its wall time
        (left out of the epoch's training time) and the batches it draws through
        :meth:`iterate`. For a method's measurements outside training proper (valuation
        passes, k-means diagnoses, teachers), so methods compare on their training cost with
        the estimation reported apart. Nesting and :meth:`sub_train` inside are counted once.
        """
        outer = self._estimating
        self._estimating = True
        before = self.estimation_cost.time_s
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._estimating = outer
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if not outer:  # the outermost block measures the whole, nested charges included
                nested = self.estimation_cost.time_s - before
                self.estimation_cost.time_s += (time.perf_counter() - t0) - nested

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
        *,
        schedule: bool = False,
        select_on: str | None = None,
        score_fn: Any = None,
    ) -> SubTrainCost:
        """Train ``params`` of ``model`` (a copy of the run's model, or some of its heads)
        for ``epochs`` on ``split`` with ``loss_fn(model, batch)``. Parameters outside
        ``params`` are frozen for the duration. The optimizer defaults to the dataset recipe
        at the run's base learning rate. Its steps and wall time are the method's estimation
        cost, recorded apart from the main run's.

        ``schedule``: step the recipe's schedule (``make_scheduler`` over ``epochs``) after
        each sub-epoch, as the main loop does, instead of the constant base rate.
        ``select_on``: a split ("val") scored after each sub-epoch with ``score_fn(model,
        batch) -> per-sample scores`` (higher is better; e.g. 1.0 where the prediction is
        right) in eval mode; the whole ``model`` state of the best epoch (earliest on ties)
        is restored at the end, as a real run selects its best validation epoch. Without
        either, the numbers are exactly those of the plain sub-training. The evaluation
        passes are charged to the estimation cost too (time and batches)."""
        if select_on is not None and score_fn is None:
            raise MMBalanceError(f"sub_train(select_on={select_on!r}) needs a score_fn(model, batch).")
        params = list(params)
        wanted = {id(p) for p in params}
        frozen = [(p, p.requires_grad) for p in model.parameters() if id(p) not in wanted]
        for p, _ in frozen:
            p.requires_grad_(False)
        opt = optimizer if optimizer is not None else self.default_optimizers(params)[0]
        sched = self.make_scheduler(opt, epochs) if schedule else None
        cost = SubTrainCost()
        best: dict[str, torch.Tensor] | None = None
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
                if sched is not None:
                    sched.step()
                if select_on is not None:
                    score = self._sub_score(model, select_on, score_fn, cost)
                    cost.scores.append(score)
                    if cost.best_epoch is None or score > cost.scores[cost.best_epoch]:
                        cost.best_epoch = e
                        best = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.train(was)
            if best is not None:
                model.load_state_dict(best)
        finally:
            for p, req in frozen:
                p.requires_grad_(req)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        cost.time_s = time.perf_counter() - t0
        self.estimation_cost.add(cost)
        return cost

    @torch.no_grad()
    def _sub_score(self, model: torch.nn.Module, split: str, score_fn: Any, cost: SubTrainCost) -> float:
        """The mean per-sample score of ``model`` (eval mode) on ``split``, one host sync."""
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        for _, batch in self._limited(self.loader(self.split(split), train=False), self.cfg["limit_eval_batches"]):
            batch = to_device(batch, self.device)
            with self.autocast():
                s = score_fn(model, batch)
            total += s.detach().double().sum()
            n += int(s.shape[0])
            cost.batches += 1
        return float(total) / max(1, n)

    def recorded_run(self, method: str, overrides: Mapping[str, Any]) -> RecordedRun:
        """The finished run of ``method`` that this run's trainer and dataset settings, the
        method's defaults and ``overrides`` identify, on this run's data (UMT's teachers: a
        ``unimodal`` run of one modality). Found by its configuration hash only, its record,
        DONE marker and checkpoint checked against that identity (``mmbalance.recorded``);
        otherwise a RecordedRunError that names the command which trains it."""
        from mmbalance.config import assemble
        from mmbalance.registry import METHODS

        cls = METHODS.get(method)
        dataset_cls = type(self.dataset)
        cfg = identity_config(self.cfg, dataset_cls, cls, overrides)
        defaults = assemble(dataset_cls, cls)
        sets = []
        for k, v in cfg.items():
            if k in ("method", "dataset", "seed", "records") or v == defaults.get(k):
                continue
            if k == "backbone":
                sets += [f"backbone.{m}.{f}={x}" for m, entry in v.items() for f, x in entry.items()
                         if defaults["backbone"].get(m, {}).get(f) != x]
            else:
                sets.append(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")
        command = (f"mmbalance run --method {method} --dataset {cfg['dataset']} --seed {cfg['seed']} "
                   f"--records {self.cfg['records']}" + "".join(f" --set {x}" for x in sets))
        return find_recorded_run(Path(self.cfg["records"]), cfg, self.dataset.data_fingerprint(cfg),
                                 dataset_cls, cls, command, self.device)

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



def _column(vals: list[Any]) -> list[float]:
    """One diagnostic's per-step values as floats: plain floats stay on the host (no copy to
    the device and back), device tensors come over in one stacked copy."""
    if all(not isinstance(v, torch.Tensor) for v in vals):
        return torch.tensor([float(v) for v in vals], dtype=torch.float32).tolist()
    dev = next(v.device for v in vals if isinstance(v, torch.Tensor))
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dev) for v in vals]).cpu().tolist()


