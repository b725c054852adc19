"""Run-time pieces shared by the training scripts: accelerator set-up, atomic checkpoints, EMA, LR schedule,
metrics logging and the epoch/step bookkeeping that makes a resumed run identical to an uninterrupted one."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..flextok_core.fileio import atomic_write, remove_dir, replace_dir  # noqa: F401  (re-exported)
from .config import flatten, save_config

logger = logging.getLogger("flextok_kit.training")

# -------------------------------------------------------------------------------------------------------------
# Atomic file helpers
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


# -------------------------------------------------------------------------------------------------------------
# Accelerator
def resolve_trackers(spec) -> list[str] | None:
    import importlib.util

    if spec in (None, "none", "", False):
        return None
    names = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for n in names:
        if n == "auto":
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                out.append("tensorboard")
            else:
                logger.info("tracker=auto: tensorboard is not installed, logging to metrics.jsonl only")
        else:
            out.append(n)
    return out or None


def launched_without_accelerator_device() -> bool:
    """True when started by a multi-process launcher (torchrun / ``accelerate launch --multi_gpu``) on a machine
    without GPUs: accelerate then needs ``cpu=True`` to form a gloo process group (MULTI_CPU) instead of running
    every process alone. (``accelerate launch --cpu --num_processes N`` starts a single process unless mpirun is
    configured.)"""
    import accelerate.utils as au

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("LOCAL_RANK") is None:
        return False
    if torch.cuda.is_available():
        return False
    for name in ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available",
                 "is_sdaa_available", "is_neuron_available"):
        fn = getattr(au, name, None)
        try:
            if fn is not None and fn():
                return False
        except Exception:  # noqa: BLE001
            pass
    return True


def build_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    if cfg.get("allow_tf32", True) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.output_dir)
    kwargs = {}
    if cfg.get("mixed_precision") not in (None, "null"):
        mp = str(cfg.mixed_precision)
        if mp not in ("no", "bf16", "fp16", "fp8"):
            raise ValueError(f"mixed_precision must be no, bf16, fp16 or fp8, got {mp!r}")
        kwargs["mixed_precision"] = mp
    if launched_without_accelerator_device():
        kwargs["cpu"] = True
    accelerator = Accelerator(
        gradient_accumulation_steps=int(cfg.gradient_accumulation_steps),
        log_with=resolve_trackers(cfg.get("tracker")),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, even_batches=True),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(cfg.find_unused_parameters))],
        **kwargs,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING, force=True)
    return accelerator


def init_run(accelerator, cfg, run_name: str) -> None:
    """Output folder, resolved config (``config.yaml``), trackers."""
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if accelerator.log_with:
        accelerator.init_trackers(cfg.get("project_name", "flextok"), config=flatten(cfg),
                                  init_kwargs=cfg.get("tracker_kwargs") or {})
    accelerator.wait_for_everyone()
    logger.info("%s: %d process(es), device %s, mixed precision %s, output %s", run_name, accelerator.num_processes,
                accelerator.device, accelerator.mixed_precision, out)


def start_run(cfg, run_name: str):
    """The accelerator (:func:`build_accelerator`), the output folder with ``config.yaml`` and the trackers
    (:func:`init_run`), then the global seed for building the models. -> the accelerator."""
    from accelerate.utils import set_seed

    accelerator = build_accelerator(cfg)
    init_run(accelerator, cfg, run_name)
    set_seed(int(cfg.seed))
    return accelerator


class MetricsLog:
    """Appends JSON lines to ``output_dir/metrics.jsonl`` (main process) and forwards to the accelerate trackers."""

    def __init__(self, accelerator, output_dir):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"

    def log(self, values: dict, step: int) -> None:
        values = {k: (float(v.detach().float().mean()) if torch.is_tensor(v) else v) for k, v in values.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(accelerator, cfg, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="steps",
                disable=not (accelerator.is_local_main_process and cfg.get("progress_bar", True)))


# -------------------------------------------------------------------------------------------------------------
# Optimisation
def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then ``cosine`` decay to ``min_lr_ratio * base_lr`` at
    ``total_steps`` (or ``constant`` / ``linear``). ``step`` is the number of optimizer steps already taken."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1 - progress
    else:
        raise ValueError(f"lr schedule must be cosine, linear or constant, got {schedule!r}")
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * factor)


def optimizer_update(accelerator, module, optimizer, optim_cfg, step: int, total_steps: int) -> dict:
    """The update after ``accelerator.backward`` inside ``accelerator.accumulate``: on a sync step clip the gradients
    (``grad_clip``) and set the scheduled learning rate; then step and zero the optimizer. -> values to log."""
    out = {}
    if accelerator.sync_gradients:
        if optim_cfg.grad_clip:
            out["grad_norm"] = accelerator.clip_grad_norm_(module.parameters(), float(optim_cfg.grad_clip))
        lr = lr_at(step, float(optim_cfg.lr), int(optim_cfg.warmup_steps), total_steps, optim_cfg.schedule,
                   float(optim_cfg.min_lr_ratio))
        set_lr(optimizer, lr)
        out["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


NO_DECAY_NAMES = ("registers", "register_pos_embed", "pos_embed", "mask_token", "null_cond", "embedding",
                  "embed_tokens", "cls_embed", "norm")


def param_groups(named_params: Iterable, weight_decay: float, no_decay_names=NO_DECAY_NAMES) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, embeddings, register/mask/null tokens)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        if p.dim() < 2 or any(n in name.split(".") or leaf == n for n in no_decay_names) or "embed" in leaf:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(named_params, optim_cfg) -> torch.optim.AdamW:
    groups = param_groups(named_params, float(optim_cfg.weight_decay))
    kwargs = dict(lr=float(optim_cfg.lr), betas=tuple(optim_cfg.betas), eps=float(optim_cfg.get("eps", 1e-8)))
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of parameters (float32 shadow copy), with optional warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))``. ``state_dict``/``load_state_dict`` make it checkpointable with
    CheckpointManager (saved as safetensors). Works on local shards too (FSDP), parameter by parameter."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999, warmup: bool = True,
                 update_after_step: int = 0):
        params = list(parameters)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_after_step = int(update_after_step)
        self.num_updates = 0
        self.shadow = [_local(p.detach()).float().clone() for p in params]
        self._backup: list | None = None

    def current_decay(self) -> float:
        t = self.num_updates - self.update_after_step
        if t <= 0:
            return 0.0
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.num_updates += 1
        d = self.current_decay()
        params = [_local(p.detach()).float() for p in parameters]
        if d == 0.0:
            for s, p in zip(self.shadow, params):
                s.copy_(p)
        else:
            torch._foreach_lerp_(self.shadow, params, 1.0 - d)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, parameters):
            _local(p.data).copy_(s.to(p.dtype))

    @torch.no_grad()
    def store(self, parameters) -> None:
        self._backup = [_local(p.detach()).clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for b, p in zip(self._backup, parameters):
            _local(p.data).copy_(b)
        self._backup = None

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "warmup": self.warmup,
                "update_after_step": self.update_after_step, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.warmup = bool(state.get("warmup", True))
        self.update_after_step = int(state.get("update_after_step", 0))
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        device = self.shadow[0].device if self.shadow else "cpu"
        self.shadow = [s.to(device=device, dtype=torch.float32) for s in state["shadow"]]


# -------------------------------------------------------------------------------------------------------------
# Loop bookkeeping and checkpoints
@dataclass
class LoopState:
    step: int = 0               # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0     # micro-batches of the current epoch already consumed (this process)
    skipped_images: int = 0     # unreadable images skipped so far (all processes)
    samples: int = 0            # training samples seen (all processes)

    def to_json(self) -> dict:
        return asdict(self)


def build_ema(ema_cfg, parameters, device):
    """(EMA or None, the ``emas`` list the loop updates) for ``parameters`` (a callable returning them), per the
    config's ``ema`` section; a decay of 0 turns it off."""
    if float(ema_cfg.decay) <= 0:
        return None, []
    ema = EMA(parameters(), float(ema_cfg.decay), bool(ema_cfg.warmup), int(ema_cfg.update_after_step))
    ema.to(device)
    return ema, [(ema, parameters)]


def ema_checkpoint_slots(accelerator, ema) -> dict:
    """CheckpointManager keyword arguments that save ``ema`` (None: nothing) as safetensors: one file per rank
    when FSDP shards it, else one file written by the main process."""
    if ema is None:
        return {}
    if accelerator.distributed_type.name == "FSDP":
        return {"per_rank": {"ema": ema}}
    return {"replicated": {"ema": ema}}


def gathered_state_dict(accelerator, module, params, ema=None) -> dict | None:
    """The full state dict of ``module`` on the main process (None elsewhere), with the EMA weights swapped
    into ``params`` while it is gathered when ``ema`` is given. Every rank must call it (FSDP gathers)."""
    params = list(params)
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    sd = {k: v.detach().cpu().clone() for k, v in accelerator.get_state_dict(module).items()}
    if ema is not None:
        ema.restore(params)
    return sd if accelerator.is_main_process else None


class CheckpointManager:
    """``accelerator.save_state`` into ``checkpoints/.tmp-step_N``, then (main process) ``meta.json`` and a rename to
    ``checkpoints/step_N``: a folder named ``step_N`` is always complete, so a run killed at any moment resumes from
    the last complete checkpoint. Keeps the last ``keep_last``.

    Extra state (name -> object with ``state_dict()`` of tensors / a list ``shadow`` of tensors, e.g. the EMA) is
    written as safetensors rather than through ``register_for_checkpointing``, whose pickles accelerate loads with
    ``weights_only=False``: ``per_rank`` objects by every rank as ``{name}_rank{r}.safetensors`` (state that
    differs between ranks, e.g. FSDP-sharded EMA), ``replicated`` ones once by the main process as
    ``{name}.safetensors`` and read by every rank.
    """

    def __init__(self, accelerator, output_dir, keep_last: int = 3, per_rank: dict | None = None,
                 replicated: dict | None = None):
        self.accelerator = accelerator
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))
        self.per_rank = per_rank or {}
        self.replicated = replicated or {}

    @staticmethod
    def _write_state(obj, path: Path) -> None:
        sd = obj.state_dict()
        tensors = {f"{i}": t.detach().cpu().contiguous() for i, t in enumerate(sd.pop("shadow", []))}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in sd.items() if torch.is_tensor(v)})
        meta = {k: json.dumps(v) for k, v in sd.items() if not torch.is_tensor(v)}
        atomic_save_safetensors(path, tensors, meta)

    @staticmethod
    def _read_state(obj, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as sf:
            md = sf.metadata() or {}
            keys = sorted((k for k in sf.keys() if k.isdigit()), key=int)
            sd = {k: json.loads(v) for k, v in md.items()}
            sd["shadow"] = [sf.get_tensor(k) for k in keys]
        obj.load_state_dict(sd)

    @staticmethod
    def complete_checkpoints(ckpt_dir) -> list[Path]:
        d = Path(ckpt_dir)
        if not d.is_dir():
            return []
        found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        ckpts = self.complete_checkpoints(self.dir)
        return ckpts[-1] if ckpts else None

    def clean_partial(self) -> None:
        """Remove leftovers of a killed save (``.tmp-*``, ``.trash-*``). Call on all ranks at start-up."""
        if self.accelerator.is_main_process and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    logger.info("removing incomplete checkpoint folder %s", p)
                    shutil.rmtree(p, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, state: LoopState, extra_meta: dict | None = None) -> Path:
        acc = self.accelerator
        name = f"step_{state.step:08d}"
        tmp, final = self.dir / f".tmp-{name}", self.dir / name
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        for obj_name, obj in self.per_rank.items():
            self._write_state(obj, tmp / f"{obj_name}_rank{acc.process_index}.safetensors")
        if acc.is_main_process:
            for obj_name, obj in self.replicated.items():
                self._write_state(obj, tmp / f"{obj_name}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"loop": state.to_json(), "num_processes": acc.num_processes, "time": time.time(),
                    **(extra_meta or {})}
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
            replace_dir(tmp, final)
            for old in self.complete_checkpoints(self.dir)[: -self.keep_last]:
                remove_dir(old)
        acc.wait_for_everyone()
        logger.info("saved checkpoint %s", final)
        return final

    def load(self, path) -> LoopState:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("num_processes") not in (None, self.accelerator.num_processes):
            logger.warning("checkpoint %s was written by %s processes, resuming with %d: the data order after resuming "
                           "differs from an uninterrupted run", path, meta["num_processes"],
                           self.accelerator.num_processes)
        self.accelerator.load_state(str(path))
        for obj_name, obj in self.per_rank.items():
            self._read_state(obj, path / f"{obj_name}_rank{self.accelerator.process_index}.safetensors")
        for obj_name, obj in self.replicated.items():
            self._read_state(obj, path / f"{obj_name}.safetensors")
        loop = LoopState(**meta["loop"])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, loop.step, loop.epoch,
                    loop.batch_in_epoch)
        return loop

    def resolve_resume(self, resume) -> Path | None:
        if resume in (None, "none", False, ""):
            return None
        if resume in ("auto", "latest", True):
            return self.latest()
        p = Path(resume)
        if not (p / "meta.json").is_file():
            raise FileNotFoundError(f"resume={resume!r}: not a complete checkpoint folder (no meta.json)")
        return p


@dataclass(kw_only=True)
class TrainRun:
    """What a training script's ``train_step``, ``evaluate`` and ``export`` share: built once by the script's
    ``build_run`` (after ``accelerator.prepare``); each script subclasses it with its own pieces."""

    cfg: Any
    accelerator: Any
    module: torch.nn.Module                  # the prepared (DDP/FSDP-wrapped) train module
    raw: torch.nn.Module                     # the same module, unwrapped
    optimizer: torch.optim.Optimizer
    loader: Any
    ema: EMA | None
    emas: list                               # (EMA, params_fn) pairs the loop updates (see build_ema)
    ckpt: CheckpointManager
    total_steps: int                         # optimizer steps of the whole run (the LR schedule's length)
    fixed: dict | None = None                # the evaluation batch

    @classmethod
    def prepare(cls, cfg, accelerator, module, loader, eval_data, collate_fn, ema_params, **extra):
        """What every stage does once its train module and data exist, in the order that fixes the random
        streams: the optimizer, ``accelerator.prepare``, the EMA of ``ema_params(unwrapped module)``, the per-rank
        seed, checkpoints, the run's length and the evaluation batch."""
        from accelerate.utils import set_seed

        from .data import fixed_batch

        optimizer = build_adamw(module.named_parameters(), cfg.optim)
        module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
        raw = accelerator.unwrap_model(module)
        ema, emas = build_ema(cfg.ema, ema_params(raw), accelerator.device)
        set_seed(int(cfg.seed), device_specific=True)  # per-rank training randomness (restored by load_state)
        ckpt = CheckpointManager(accelerator, cfg.output_dir, int(cfg.keep_last),
                                 **ema_checkpoint_slots(accelerator, ema))
        total = resolve_max_steps(cfg, loader)
        fixed = fixed_batch(eval_data, int(cfg.eval_batch_size), collate_fn=collate_fn)
        return cls(cfg=cfg, accelerator=accelerator, module=module, raw=raw, optimizer=optimizer, loader=loader,
                   ema=ema, emas=emas, ckpt=ckpt, total_steps=total, fixed=fixed, **extra)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def export_ema(self) -> bool:
        return self.ema is not None and bool(self.cfg.export.use_ema)

    def export_dir(self) -> Path:
        return Path(self.cfg.export.dir or Path(self.cfg.output_dir) / "export")

    def export_weights(self, params, prefix: str) -> dict | None:
        """The weights to export (the EMA's with ``export.use_ema``) under the train module's ``prefix`` (e.g.
        ``"vae."``, stripped), float32, on the main process; None elsewhere. Every rank must call it (FSDP)."""
        sd = gathered_state_dict(self.accelerator, self.module, params, self.ema if self.export_ema else None)
        if sd is None:
            return None
        return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def batches(accelerator, loader, state: LoopState):
    """Yield micro-batches forever, epoch after epoch, keeping ``state.epoch``/``state.batch_in_epoch`` current.
    The first epoch after a resume skips the batches already consumed (``accelerator.skip_first_batches``)."""
    first = True
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        dl = loader
        if first and state.batch_in_epoch > 0:
            dl = accelerator.skip_first_batches(loader, state.batch_in_epoch)
            if hasattr(dl, "set_epoch"):
                dl.set_epoch(state.epoch)
        first = False
        got = False
        for batch in dl:
            got = True
            state.batch_in_epoch += 1
            yield batch
        if not got and state.batch_in_epoch == 0:
            raise RuntimeError("the data loader yielded no batch in a whole epoch (dataset smaller than one batch "
                               "per process?)")
        state.epoch += 1
        state.batch_in_epoch = 0


def steps_per_epoch(loader, grad_accum: int) -> int | None:
    try:
        return max(1, math.ceil(len(loader) / grad_accum))
    except TypeError:
        return None


def resolve_max_steps(cfg, loader) -> int:
    if cfg.get("epochs"):
        spe = steps_per_epoch(loader, int(cfg.gradient_accumulation_steps))
        if spe is None:
            raise ValueError("epochs=... needs map-style data (a length); set max_steps for streaming data")
        return int(cfg.epochs) * spe
    return int(cfg.max_steps)


def reduce_sum(accelerator, value: int | float) -> float:
    t = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item()) if accelerator.num_processes > 1 else float(value)


def unwrap(accelerator, model):
    return accelerator.unwrap_model(model)


def full_state_dict(accelerator, model) -> dict:
    """Full (gathered) state dict of a prepared model, on every rank's CPU (valid on the main process)."""
    sd = accelerator.get_state_dict(model)
    return {k: v.detach().cpu() for k, v in sd.items()} if sd is not None else {}


def module_device_dtype(module: torch.nn.Module):
    p = next(module.parameters())
    return p.device, p.dtype


def maybe_sleep(cfg) -> None:
    s = float((cfg.get("debug") or {}).get("step_sleep") or 0.0)
    if s > 0:
        time.sleep(s)
