"""The step loop shared by the training scripts: resume, epochs, logging, evaluation on a fixed batch, atomic
checkpoints, progress bar and the final export."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Iterable

import torch

from .utils import (CheckpointManager, LoopState, MetricsLog, batches, logger, maybe_sleep, progress_bar,
                    reduce_sum, resolve_max_steps)


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
    ckpt.clean_partial()
    state = LoopState()
    resume_path = ckpt.resolve_resume(cfg.get("resume", "auto"))
    if resume_path is not None:
        state = ckpt.load(resume_path)
    max_steps = resolve_max_steps(cfg, loader)
    stop_after = (cfg.get("debug") or {}).get("stop_after_steps")
    log_every = max(1, int(cfg.log_every))
    eval_every = int(cfg.get("eval_every") or 0)
    ckpt_every = int(cfg.get("checkpoint_every") or 0)
    emas = list(emas)

    def run_eval():
        if evaluate is None:
            return
        metrics = evaluate()
        if metrics:
            log.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)

    if state.step == 0:
        run_eval()
    sums: dict = defaultdict(float)
    count = 0
    pending_samples = pending_skipped = 0
    last_saved = state.step if resume_path is not None else -1
    t_last, samples_last = time.time(), state.samples
    bar = progress_bar(accelerator, cfg, max_steps, state.step)

    def sync_counters():
        nonlocal pending_samples, pending_skipped
        state.samples += int(reduce_sum(accelerator, pending_samples))
        state.skipped_images += int(reduce_sum(accelerator, pending_skipped))
        pending_samples = pending_skipped = 0

    if state.step < max_steps:
        for batch in batches(accelerator, loader, state):
            pending_samples += batch_size_of(batch)
            if "skipped" in batch:
                pending_skipped += int(batch["skipped"].sum())
            if isinstance(batch.get("dropped"), int):
                pending_skipped += batch["dropped"]
            out = train_step(batch, state)
            for k, v in (out or {}).items():
                sums[k] += float(v.detach().float()) if torch.is_tensor(v) else float(v)
            count += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            for ema, params_fn in emas:
                ema.update(params_fn())
            bar.update(1)
            if state.step % log_every == 0 or state.step == max_steps:
                sync_counters()
                now = time.time()
                metrics = {k: v / max(1, count) for k, v in sums.items()}
                metrics.update(epoch=state.epoch, samples=state.samples, skipped_images=state.skipped_images,
                               samples_per_s=(state.samples - samples_last) / max(1e-9, now - t_last))
                log.log(metrics, step=state.step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr")})
                sums.clear()
                count = 0
                t_last, samples_last = now, state.samples
            if eval_every and state.step % eval_every == 0 and state.step != max_steps:
                run_eval()
            if (ckpt_every and state.step % ckpt_every == 0) or state.step == max_steps:
                sync_counters()
                ckpt.save(state)
                last_saved = state.step
            maybe_sleep(cfg)
            if state.step >= max_steps or (stop_after and state.step >= int(stop_after)):
                break
    bar.close()
    if stop_after and state.step < max_steps:
        logger.info("debug.stop_after_steps=%s reached: stopping without export", stop_after)
        accelerator.end_training()
        return state
    if last_saved != state.step:
        sync_counters()
        ckpt.save(state)
    run_eval()
    if (cfg.get("debug") or {}).get("rank_checksums"):
        write_rank_checksums(accelerator, cfg.output_dir, modules, state)
    if export is not None:
        export(state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state


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
