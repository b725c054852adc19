"""The step loop shared by the training scripts: resume, epochs, logging, evaluation on a fixed batch, atomic
checkpoints, progress bar and the final export."""
from __future__ import annotations

from functools import partial

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .utils import (CheckpointManager, LoopState, MetricsLog, batches, logger, maybe_sleep, progress_bar,
                    reduce_sum, resolve_max_steps)


def run_stage(run, train_step, evaluate, export, **kwargs) -> LoopState:
    """:func:`training_loop` over a built ``TrainRun`` (utils.py), with a stage's ``train_step(run, batch, state)``,
    ``evaluate(run)`` and ``export(run, state)`` bound to it; ``modules`` defaults to the run's train module."""
    kwargs.setdefault("modules", [run.module])
    return training_loop(run.accelerator, run.cfg, run.loader, partial(train_step, run), ckpt=run.ckpt,
                         evaluate=partial(evaluate, run), export=partial(export, run), emas=run.emas, **kwargs)


def training_loop(
    accelerator,
    cfg,
    loader,
    train_step: Callable[[dict, LoopState], dict],
    *,
    ckpt: CheckpointManager,
    evaluate: Callable[[], dict] | None = None,
    export: Callable[[LoopState], None] | None = None,
    emas: Iterable[tuple] = (),
    batch_size_of: Callable[[dict], int] = lambda b: len(b["pixels"]),
    modules: Iterable[torch.nn.Module] = (),
) -> LoopState:
    """Run ``train_step(batch, state)`` (which does the backward pass and, on synchronising micro-steps, the optimizer
    step inside ``accelerator.accumulate``) until ``max_steps`` optimizer steps.

    ``emas`` are ``(EMA, params_fn)`` pairs updated after every optimizer step. ``evaluate()`` returns metrics on a
    fixed batch (logged with an ``eval/`` prefix at the start, every ``eval_every`` steps and at the end).
    """
    log = MetricsLog(accelerator, cfg.output_dir)
    state, resumed = resume(ckpt, cfg)
    every = Schedule.from_config(cfg, loader)
    if state.step == 0:
        log_eval(log, evaluate, state)
    tally = Tally(accelerator, state)
    last_saved = state.step if resumed else -1
    bar = progress_bar(accelerator, cfg, every.max_steps, state.step)
    emas = list(emas)
    if state.step < every.max_steps:
        for batch in batches(accelerator, loader, state):
            tally.add_batch(batch, batch_size_of(batch))
            tally.add_outputs(train_step(batch, state))
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            for ema, params_fn in emas:
                ema.update(params_fn())
            bar.update(1)
            if every.log(state.step):
                metrics = tally.flush(state)
                log.log(metrics, step=state.step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr")})
            if every.evaluate(state.step):
                log_eval(log, evaluate, state)
            if every.checkpoint(state.step):
                tally.sync_counters(state)
                ckpt.save(state)
                last_saved = state.step
            maybe_sleep(cfg)
            if every.stop(state.step):
                break
    bar.close()
    if every.stopped_early(state.step):
        logger.info("debug.stop_after_steps=%s reached: stopping without export", every.stop_after)
        accelerator.end_training()
        return state
    if last_saved != state.step:
        tally.sync_counters(state)
        ckpt.save(state)
    log_eval(log, evaluate, state)
    if (cfg.get("debug") or {}).get("rank_checksums"):
        write_rank_checksums(accelerator, cfg.output_dir, modules, state)
    if export is not None:
        export(state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state


def resume(ckpt: CheckpointManager, cfg) -> tuple[LoopState, bool]:
    """Clean up a killed save, then the loop state of the checkpoint ``cfg.resume`` names (its models, optimizers,
    RNG and extra state loaded), or a fresh one. -> (state, resumed)."""
    ckpt.clean_partial()
    resume_path = ckpt.resolve_resume(cfg.get("resume", "auto"))
    if resume_path is None:
        return LoopState(), False
    return ckpt.load(resume_path), True


@dataclass
class Schedule:
    """When the loop logs, evaluates, checkpoints and stops (``step``: optimizer steps taken)."""

    max_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    stop_after: int | None              # debug.stop_after_steps: stop there without the final export

    @classmethod
    def from_config(cls, cfg, loader) -> "Schedule":
        return cls(max_steps=resolve_max_steps(cfg, loader), log_every=max(1, int(cfg.log_every)),
                   eval_every=int(cfg.get("eval_every") or 0), checkpoint_every=int(cfg.get("checkpoint_every") or 0),
                   stop_after=(cfg.get("debug") or {}).get("stop_after_steps"))

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def evaluate(self, step: int) -> bool:  # the final evaluation runs after the loop
        return bool(self.eval_every) and step % self.eval_every == 0 and step != self.max_steps

    def checkpoint(self, step: int) -> bool:
        return bool(self.checkpoint_every and step % self.checkpoint_every == 0) or step == self.max_steps

    def stop(self, step: int) -> bool:
        return step >= self.max_steps or bool(self.stop_after and step >= int(self.stop_after))

    def stopped_early(self, step: int) -> bool:
        return bool(self.stop_after) and step < self.max_steps


class Tally:
    """What the loop accumulates between two logs: the sums of ``train_step``'s outputs over micro-batches, and the
    samples and skipped images seen by this process that are not yet added (over all processes) to the state."""

    def __init__(self, accelerator, state: LoopState):
        self.accelerator = accelerator
        self.sums: dict = defaultdict(float)
        self.count = 0
        self.pending_samples = self.pending_skipped = 0
        self.t_last, self.samples_last = time.time(), state.samples

    def add_batch(self, batch: dict, batch_size: int) -> None:
        self.pending_samples += batch_size
        if "skipped" in batch:
            self.pending_skipped += int(batch["skipped"].sum())
        if isinstance(batch.get("dropped"), int):
            self.pending_skipped += batch["dropped"]

    def add_outputs(self, out: dict | None) -> None:
        for k, v in (out or {}).items():
            self.sums[k] += float(v.detach().float()) if torch.is_tensor(v) else float(v)
        self.count += 1

    def sync_counters(self, state: LoopState) -> None:
        """Add the pending counts of every process to ``state`` (a collective: every rank calls it)."""
        state.samples += int(reduce_sum(self.accelerator, self.pending_samples))
        state.skipped_images += int(reduce_sum(self.accelerator, self.pending_skipped))
        self.pending_samples = self.pending_skipped = 0

    def flush(self, state: LoopState) -> dict:
        """The metrics to log now (means since the last log, counters, throughput); starts the next interval."""
        self.sync_counters(state)
        now = time.time()
        metrics = {k: v / max(1, self.count) for k, v in self.sums.items()}
        metrics.update(epoch=state.epoch, samples=state.samples, skipped_images=state.skipped_images,
                       samples_per_s=(state.samples - self.samples_last) / max(1e-9, now - self.t_last))
        self.sums.clear()
        self.count = 0
        self.t_last, self.samples_last = now, state.samples
        return metrics


def log_eval(log: MetricsLog, evaluate: Callable[[], dict] | None, state: LoopState) -> None:
    if evaluate is None:
        return
    metrics = evaluate()
    if metrics:
        log.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)


def state_checksum(module: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_rank_checksums(accelerator, output_dir, modules, state) -> None:
    """Every rank writes ``rank_checksums/rank{r}.json`` with a hash of its copy of each model (DDP replicas must
    agree)."""
    import json
    from pathlib import Path

    from .utils import atomic_write_text

    sums = [state_checksum(accelerator.unwrap_model(m)) for m in modules]
    atomic_write_text(Path(output_dir) / "rank_checksums" / f"rank{accelerator.process_index}.json",
                      json.dumps({"step": state.step, "checksums": sums}))
