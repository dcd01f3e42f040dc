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
import sys
import time
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

from mmbalance import records
from mmbalance.config import config_hash
from mmbalance.data import BatchView, DatasetPlugin, Splits
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.method import Method, Prediction
from mmbalance.metrics import classification_metrics, final_metrics
from mmbalance.model import MultimodalModel, build_encoder


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


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


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
        self.hash = config_hash(self.cfg)
        self.run_dir = Path(self.cfg["records"]) / records.run_dir_name(self.cfg, self.hash)
        amp = self.cfg["amp"]
        self.amp_dtype = (
            torch.bfloat16 if (amp == "bf16" or (amp == "auto" and self.device.type == "cuda")) else None
        )
        self._step_logs: dict[str, list[Any]] = {}
        self.optimizer_steps = 0
        self.history: list[dict[str, Any]] = []
        self.splits: Splits | None = None
        self.model: MultimodalModel | None = None

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
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
        seed_everything(cfg["seed"])
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
        self.method.trainer = self
        self.method.model = model
        self.method.configure_model(model)
        self.model = model.to(self.device)
        self.optimizer, self.scheduler = self.method.configure_optimizers()
        self.method.optimizer = self.optimizer
        self.modalities = used

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
    def loader(self, ds: Dataset, train: bool, epoch: int = 0) -> DataLoader:
        """Shuffled (train) or ordered loader; the shuffle is seeded from (seed, epoch)."""
        cfg = self.cfg
        gen = torch.Generator()
        gen.manual_seed(epoch_seed(cfg["seed"], epoch))
        bs = cfg["batch_size"] if train else (cfg["eval_batch_size"] or 2 * cfg["batch_size"])
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
        return DataLoader(ds, batch_size=bs, shuffle=train, drop_last=False, collate_fn=self._collate, **common)

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

    # ---- the loop -------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        assert self.model is not None and self.splits is not None
        method, model = self.method, self.model
        seed_everything(epoch_seed(self.cfg["seed"], epoch))
        loader = self.loader(self.splits.train, train=True, epoch=epoch)
        limit = self.cfg["limit_train_batches"]
        total = min(len(loader), limit) if limit else len(loader)
        model.train()
        method.epoch = epoch
        method.on_train_epoch_start(epoch)
        loss_sum = torch.zeros((), device=self.device)
        n_batches = 0
        self._step_logs = {}
        for i, batch in self._progress(self._limited(loader, limit), total, f"epoch {epoch}"):
            batch = to_device(batch, self.device)
            if method.manual_optimization:
                with self.autocast():
                    loss = method.training_step(batch, i)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = method.training_step(batch, i)
                if loss is None:
                    raise RuntimeError(
                        f"method {method.name}: training_step returned no loss in automatic mode"
                    )
                loss.backward()
                method.on_after_backward()
                self.optimizer_step(self.optimizer)
            if loss is not None:
                loss_sum += loss.detach().float()
            n_batches += 1
            method.global_step += 1
        method.on_train_epoch_end(epoch)
        if self.scheduler is not None:
            self.scheduler.step()
        train_loss = (loss_sum / max(1, n_batches)).item()
        if not math.isfinite(train_loss):
            raise MMBalanceError(
                f"Training diverged in epoch {epoch}: the mean training loss is {train_loss}. "
                f"Lower the learning rate (--set lr=...) or enable gradient clipping "
                f"(--set grad_clip=1.0)."
            )
        return {"train_loss": train_loss, "train_batches": n_batches}

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
            k: torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in vals]).cpu().tolist()
            for k, vals in self._step_logs.items()
        }  # one device-to-host copy per diagnostic per epoch
        n = max(len(v) for v in cols.values())
        rows = [{k: (v[i] if i < len(v) else None) for k, v in cols.items()} | {"step": i} for i in range(n)]
        records.write_jsonl(self.run_dir / "diagnostics" / f"epoch_{epoch:04d}.jsonl", rows)
        return {k: float(np.nanmean(v)) for k, v in cols.items()}

    # ---- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int) -> None:
        assert self.model is not None
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "method": self.method.state_dict(),
            "global_step": self.method.global_step,
            "optimizer_steps": self.optimizer_steps,
            "history": self.history,
        }
        records.atomic_torch_save(state, self.run_dir / records.CHECKPOINT)

    def _load_checkpoint(self) -> int:
        """Restore the last finished epoch; returns the next epoch to run (0 if none)."""
        path = self.run_dir / records.CHECKPOINT
        if not path.exists():
            return 0
        assert self.model is not None
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
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
            "method_info": self.method.record_info(),
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
    def fit(self) -> dict[str, Any]:
        """Train (or resume, or skip if already done) and return the folded record."""
        if (self.run_dir / records.DONE).exists():
            return records.load_record(self.run_dir)
        self.setup()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records.write_config(self.run_dir / "config.yaml", self.cfg)
        header = self._header()
        start = self._load_checkpoint() if self.cfg["checkpoint"] else 0
        if start:
            header["resumed_from_epoch"] = start
        self.method.on_fit_start()
        wandb_run = self._wandb_init() if self.cfg["wandb"] else None
        for epoch in range(start, self.cfg["epochs"]):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            steps_before = self.optimizer_steps
            t0 = time.perf_counter()
            train = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            val = self.evaluate(self.splits.val)
            test = self.evaluate(self.splits.test)
            t2 = time.perf_counter()
            self.method.on_validation_end({"val": val, "test": test, "epoch": epoch})
            entry = {
                "epoch": epoch,
                **train,
                "optimizer_steps": self.optimizer_steps - steps_before,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_time_s": t1 - t0,
                "eval_time_s": t2 - t1,
                "peak_mem_mb": (
                    torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
                ),
                "diagnostics": self._diagnostics(epoch),
                "val": val,
                "test": test,
            }
            self.history.append(entry)
            if self.cfg["checkpoint"]:
                self._save_checkpoint(epoch)
            self._write_record(header, None)
            if wandb_run is not None:
                wandb_run.log(_flatten({k: v for k, v in entry.items() if k != "epoch"}), step=epoch)
        final = {"selection": final_metrics(self.history), "total_train_time_s": sum(e["train_time_s"] for e in self.history)}
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


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, int | float) and v is not None:
            out[key] = v
    return out
