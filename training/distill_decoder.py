"""Few-step decoding: distil FlexTok's guided rectified-flow decoder into a student that takes S Euler steps
(S = 4 or 8) with one decoder pass per step (no unconditional pass, no guidance at sampling time).

Method: **guided trajectory regression on the student's time grid** — knowledge distillation of the sampler
(Luhman & Luhman 2021, "Knowledge distillation in iterative generative models", arXiv:2101.02388) generalised
from one step to S steps as in progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast
sampling of diffusion models", arXiv:2202.00512, whose student also regresses where the teacher's finer steps
land), with the teacher's classifier-free guidance folded into the target as in guidance distillation (Meng et al.
2023, "On distillation of guided diffusion models", arXiv:2210.03142; here with the scale fixed in the config, no
guidance embedding, so the decoder's architecture and weights layout are unchanged).

Why this method: FlexTok's decoder is small and its teacher sampler is a deterministic ODE solver (Euler + APG), so
the teacher's guided trajectory from a noise x_1 is one cheap no-grad rollout and gives *exact* targets for every
student step at once; the student is the teacher's own architecture initialised from its weights; there is no
adversarial or consistency machinery to tune, and the loss goes to zero exactly when the student's S-step sampler
reproduces the teacher's 25-step guided sampler at the grid points. Progressive halving (25 -> 12 -> 6 -> 3)
cannot reach 4 or 8 steps on FlexTok's grid t = 1, (T-1)/T, ..., 1/T and needs several rounds; consistency /
shortcut models change what the network is asked at a given t and need many more steps to converge.

Per training sample: image -> VAE latent x0 -> frozen teacher encoder + FSQ -> token ids; nested dropout keeps the
first k (``train.nested_dropout``, as stage 1, so every prefix length works); noise x_1; the teacher pipeline's own
sampler (``teacher.num_inference_steps`` Euler steps, CFG or APG at ``teacher.guidance_scale``) gives the guided
trajectory, whose Euler path is piecewise linear in t and is read off at the student's grid
t_i = flextok_sigmas(S) (exactly the pipeline's grid for S steps). The student's Euler step from the teacher's
x(t_i) must land on the teacher's x(t_{i+1}):

    x(t_i) - (t_i - t_{i+1}) v_student(x(t_i), t_i, tokens) = x(t_{i+1})
    <=>  loss = || v_student(x(t_i), t_i) - (x(t_i) - x(t_{i+1})) / (t_i - t_{i+1}) ||^2,  every i = 0..S-1.

The encoder, FSQ and VAE are frozen (the token space is the teacher's: tokens made by either pipeline decode with
either). The export (``export.dir``, default ``output_dir/export``) is the teacher's pipeline with the student's
FlexTok (EMA weights) and ``decoder_sampling`` in its ``model_index.json`` (S steps, guidance 1, the teacher's
settings under ``distilled_from``), which ``FlexTokPipeline.detokenize`` uses by default.

    accelerate launch -m flextok_kit.training.distill_decoder --config distill_tiny \
        teacher.path=demo_models/photo_tokenizer data.path=/data/images

Known limit (the method's): the student is trained on the teacher's trajectory points; at sampling time it starts
each step from its own previous output, so its errors compound over the S steps (small at S = 4..8).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..flextok_core.nested_dropout import sample_keep_k
from ..flextok_core.rng import randn
from ..flextok_core.sampling import flow_timesteps
from ..flextok_core.vae import vae_encode
from .config import config_from_argv, merged_defaults
from .data import DATA_DEFAULTS, build_dataset, make_loader, to_float
from .loop import run_stage
from .models import count_params, save_pretrained_atomic
from .utils import LoopState, TrainRun, logger, optimizer_update, start_run

METHOD = "guided trajectory regression on the student grid (Luhman & Luhman 2021; Salimans & Ho 2022)"

DEFAULTS = merged_defaults({
    "output_dir": "runs/distill",
    "data": DATA_DEFAULTS,
    "teacher": {
        "path": None,                # the teacher: a FlexTokPipeline folder (our format)
        "num_inference_steps": 25,   # the teacher's sampler the student reproduces
        "guidance_scale": 7.5,       # its decoder guidance (the model card's recommendation)
        "use_apg": True,
        "apg_momentum": -0.5,
        "apg_norm_threshold": 2.5,
        "apg_eta": 0.0,
        "batch_size": None,          # images per teacher rollout (default: all at once)
        "dtype": "float32",          # float32 | bfloat16: the teacher's FlexTok (its VAE stays float32)
    },
    "student": {
        "num_inference_steps": 4,    # S: the student's Euler steps (its grid is flextok_sigmas(S))
        "init_from": None,           # default: the teacher's decoder weights
    },
    "vae": {"sample_posterior": None},  # None: the teacher's setting (flextok config sample_posterior)
    "train": {
        "nested_dropout": "pow2",    # pow2 | uniform | none (as stage 1)
        "fast_registers": True,
    },
    "optim": {"lr": 1.0e-4, "betas": [0.9, 0.99], "weight_decay": 0.0, "eps": 1.0e-8, "warmup_steps": 100,
              "schedule": "cosine", "min_lr_ratio": 0.1, "grad_clip": 1.0},
    "ema": {"decay": 0.999, "warmup": True, "update_after_step": 0},
    "export": {"dir": None, "use_ema": True},
})


# ---------------------------------------------------------------------------------------------------------------
# the teacher's guided trajectory, read off on the student's grid
def euler_path_at(path: torch.Tensor, grid: list[float], times: list[float]) -> torch.Tensor:
    """The Euler solution ``path [T+1, ...]`` (x at t = grid[0] > ... > grid[T] = 0) at ``times``: each Euler step
    moves x linearly in t, so linear interpolation between grid points is the sampler's solution itself."""
    out = []
    for s in times:
        j = max(i for i, g in enumerate(grid[:-1]) if g >= s - 1e-9)
        j = min(j, len(grid) - 2)
        w = (grid[j] - s) / (grid[j] - grid[j + 1])
        out.append(path[j] + w * (path[j + 1] - path[j]))
    return torch.stack(out)


@torch.no_grad()
def teacher_path(teacher, sequences: list, noise: torch.Tensor, tcfg) -> torch.Tensor:
    """The teacher pipeline's own guided sampler (``detokenize``, every step's latents collected by the callback)
    from ``noise`` for token ``sequences`` -> ``[T+1, B, C, h, w]`` (x at t = 1, (T-1)/T, ..., 1/T, 0)."""
    steps = []

    def collect(pipe, i, t, tensors):
        steps.append(tensors["latents"].float())
        return tensors

    b = noise.shape[0]
    chunk = int(tcfg.batch_size or b)
    out = []
    for s in range(0, b, chunk):
        steps.clear()
        teacher.detokenize(sequences[s:s + chunk], num_inference_steps=int(tcfg.num_inference_steps),
                           guidance_scale=float(tcfg.guidance_scale), use_apg=bool(tcfg.use_apg),
                           apg_momentum=float(tcfg.apg_momentum), apg_norm_threshold=float(tcfg.apg_norm_threshold),
                           apg_eta=float(tcfg.apg_eta), latents=noise[s:s + chunk], output_type="latent",
                           callback_on_step_end=collect, callback_on_step_end_tensor_inputs=["latents"])
        out.append(torch.stack([noise[s:s + chunk].float(), *steps]))
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# the student
class StudentModule(nn.Module):
    """The student FlexTok behind one ``forward`` (what DDP/FSDP wrap): token ids + the teacher's points on the
    student grid -> the distillation loss. Only the decoder trains; encoder and FSQ stay the teacher's."""

    def __init__(self, student, fast: bool):
        super().__init__()
        self.student = student
        self.fast = bool(fast)
        student.encoder.requires_grad_(False)
        student.fsq.requires_grad_(False)

    def forward(self, ids: torch.Tensor, keep_k: list[int], points: torch.Tensor, grid: list[float]) -> dict:
        """ids ``[B, N]``, keep_k (host ints), points ``[S+1, B, C, h, w]`` (the teacher's x at ``grid``, S+1
        values from 1 to 0): every student step of every sample in one decoder batch of S*B."""
        s, b = points.shape[0] - 1, points.shape[1]
        x_t = points[:-1].flatten(0, 1)                                     # [S*B, C, h, w]
        dt = torch.tensor([grid[i] - grid[i + 1] for i in range(s)], device=points.device)
        target = ((points[:-1] - points[1:]) / dt.view(s, 1, 1, 1, 1)).flatten(0, 1)
        t = torch.tensor(grid[:-1], device=points.device, dtype=torch.float32).repeat_interleave(b)
        registers = self.student.prepare_registers(ids.repeat(s, 1), keep_k * s, guidance=False, fast=self.fast)
        v = self.student(x_t.to(self.student.dtype), t, registers).float()
        per_step = ((v - target) ** 2).flatten(1).mean(1).view(s, b).mean(1)  # [S]
        out = {"loss": F.mse_loss(v, target)}
        out.update({f"loss_step{i}": per_step[i] for i in range(s)})
        return out


@dataclass(kw_only=True)
class DistillRun(TrainRun):
    """:class:`TrainRun` (``raw`` is the unwrapped :class:`StudentModule`) plus the frozen teacher pipeline and the
    two time grids."""

    teacher: object                   # FlexTokPipeline (frozen): VAE, encoder, FSQ and the guided sampler
    student_grid: list                # t_0 = 1 > ... > t_S = 0 (the pipeline's grid for S steps, then 0)
    teacher_grid: list                # the teacher's grid, then 0
    sample_posterior: bool


def main(argv=None, cfg=None):
    if cfg is None:
        cfg = config_from_argv(argv, DEFAULTS, __doc__)
    return run_stage(build_run(cfg), train_step, evaluate, export)


def load_teacher(cfg, device):
    """The teacher pipeline on ``device`` (FlexTok in ``teacher.dtype``, the rest float32), frozen, its progress
    bars off."""
    from ..pipelines import FlexTokPipeline

    if not cfg.teacher.path:
        raise ValueError("teacher.path is required (a FlexTokPipeline folder, e.g. demo_models/photo_tokenizer)")
    if not (Path(cfg.teacher.path) / "model_index.json").is_file():
        raise ValueError(f"teacher.path={cfg.teacher.path!r} is not a FlexTokPipeline folder (no model_index.json)")
    teacher = FlexTokPipeline.from_pretrained(str(cfg.teacher.path))
    if teacher.vae is None:
        raise ValueError(f"teacher {cfg.teacher.path} has no VAE: distillation encodes images with it")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if cfg.teacher.dtype not in dtypes:
        raise ValueError(f"teacher.dtype must be one of {sorted(dtypes)}, got {cfg.teacher.dtype!r}")
    for name, m in teacher.components.items():
        if isinstance(m, nn.Module):
            dtype = dtypes[cfg.teacher.dtype] if name == "flextok" else torch.float32
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    teacher.set_progress_bar_config(disable=True)
    return teacher


def build_student(cfg, teacher):
    """A copy of the teacher's FlexTok (or ``student.init_from``'s), float32."""
    from ..flextok_core import FlexTokModel

    student = FlexTokModel.from_config(teacher.flextok.config)
    src = teacher.flextok
    if cfg.student.init_from:
        p = Path(cfg.student.init_from)
        src = FlexTokModel.from_pretrained(str(p), subfolder="flextok" if (p / "flextok").is_dir() else None)
        if dict(src.config) != dict(teacher.flextok.config):
            raise ValueError(f"student.init_from={str(p)!r} has another FlexTok config than the teacher")
    student.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    return student.float()


def check_settings(cfg) -> int:
    from ..flextok_core.sampling import check_decoder_sampling

    t = cfg.teacher
    check_decoder_sampling(t.num_inference_steps, t.guidance_scale, t.apg_momentum, t.apg_norm_threshold, t.apg_eta)
    steps = int(cfg.student.num_inference_steps)
    if not 1 <= steps < int(t.num_inference_steps):
        raise ValueError(f"student.num_inference_steps must be in [1, {int(t.num_inference_steps)}) (fewer than the "
                         f"teacher's), got {cfg.student.num_inference_steps}")
    return steps


def build_run(cfg) -> DistillRun:
    """Accelerator, frozen teacher, student (a copy of the teacher), data, optimizer, EMA and checkpoints."""
    steps = check_settings(cfg)
    accelerator = start_run(cfg, "distill_decoder")
    if not cfg.data.path:
        raise ValueError("data.path is required")
    teacher = load_teacher(cfg, accelerator.device)
    module = StudentModule(build_student(cfg, teacher), cfg.train.fast_registers)
    logger.info("student decoder %.2fM parameters (trained), encoder %.2fM (frozen); %s; %d -> %d steps",
                count_params(module.student.decoder) / 1e6, count_params(module.student.encoder) / 1e6, METHOD,
                int(cfg.teacher.num_inference_steps), steps)
    dataset = build_dataset(cfg.data, seed=int(cfg.seed))
    loader = make_loader(dataset, int(cfg.data.batch_size), int(cfg.seed), bool(cfg.data.shuffle),
                         int(cfg.data.num_workers))
    sp = cfg.vae.sample_posterior
    return DistillRun.prepare(cfg, accelerator, module, loader, dataset, None,
                              lambda raw: raw.student.decoder.parameters, teacher=teacher,
                              student_grid=flow_timesteps(steps) + [0.0],
                              teacher_grid=flow_timesteps(int(cfg.teacher.num_inference_steps)) + [0.0],
                              sample_posterior=bool(teacher.flextok.config.sample_posterior if sp is None else sp))


@torch.no_grad()
def distill_targets(run: DistillRun, batch: dict, generator=None) -> tuple:
    """A batch of images -> (token ids ``[B, N]``, nested-dropout lengths (host ints), the teacher's guided
    trajectory on the student grid ``[S+1, B, C, h, w]``). ``generator`` draws the posterior sample, k and the
    noise, in that order (None: the global RNGs)."""
    teacher, device = run.teacher, run.device
    x0 = vae_encode(teacher.vae, to_float(batch["pixels"].to(device)), run.sample_posterior, generator).float()
    n = teacher.flextok.config.num_registers
    ids = teacher.flextok.encode(x0)[1]
    keep_k = sample_keep_k(x0.shape[0], n, run.cfg.train.nested_dropout, generator=generator).tolist()
    noise = randn(x0.shape, generator, device=device, dtype=torch.float32)
    path = teacher_path(teacher, [ids[i, :k] for i, k in enumerate(keep_k)], noise, run.cfg.teacher)
    return ids, keep_k, euler_path_at(path, run.teacher_grid, run.student_grid)


def train_step(run: DistillRun, batch: dict, state: LoopState) -> dict:
    """One micro-batch: the teacher's targets, the student's loss over all its steps, backward and (on a sync step)
    the optimizer update."""
    acc = run.accelerator
    ids, keep_k, points = distill_targets(run, batch)
    with acc.accumulate(run.module):
        with acc.autocast():
            out = run.module(ids, keep_k, points, run.student_grid)
        acc.backward(out["loss"])
        out.update(optimizer_update(acc, run.module, run.optimizer, run.cfg.optim, state.step, run.total_steps))
    return {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}


@torch.no_grad()
def student_sample(student, ids, keep_k, noise, grid: list[float], fast: bool = True) -> torch.Tensor:
    """The student's S-step Euler sampler (as the pipeline runs it at guidance 1) -> final latents."""
    registers = student.prepare_registers(ids, keep_k, guidance=False, fast=fast)
    x = noise.float()
    for i in range(len(grid) - 1):
        t = torch.full((x.shape[0],), grid[i], device=x.device)
        x = x - (grid[i] - grid[i + 1]) * student(x.to(student.dtype), t, registers).float()
    return x


@torch.no_grad()
def evaluate(run: DistillRun) -> dict:
    """On the fixed batch (fixed posterior sample, k and noise): the distillation loss, and the mean squared
    distance of the final latents to the teacher's 25-step guided ones, for the student's S-step sampler and, as
    the baseline it must beat, for the teacher's own guided sampler at S steps."""
    g = torch.Generator(device=run.device).manual_seed(1234)
    ids, keep_k, points = distill_targets(run, run.fixed, generator=g)
    out = dict(run.module(ids, keep_k, points, run.student_grid))
    student = run.raw.student
    final = student_sample(student, ids, keep_k, points[0], run.student_grid, run.raw.fast)
    out["final_mse_student"] = F.mse_loss(final, points[-1])
    seqs = [ids[i, :k] for i, k in enumerate(keep_k)]
    steps = len(run.student_grid) - 1
    short = teacher_path(run.teacher, seqs, points[0], _with_steps(run.cfg.teacher, steps))[-1]
    out["final_mse_teacher_same_steps"] = F.mse_loss(short, points[-1])
    return {k: float(v) for k, v in out.items()}


def _with_steps(tcfg, steps: int):
    from .config import Config

    return Config({**tcfg, "num_inference_steps": steps})


def decoder_sampling(run: DistillRun) -> dict:
    """The export's sampling settings (``model_index.json`` ``decoder_sampling``), read by the pipeline."""
    t = run.cfg.teacher
    return {"num_inference_steps": len(run.student_grid) - 1, "guidance_scale": 1.0,
            "distilled_from": {"model": str(t.path), "num_inference_steps": int(t.num_inference_steps),
                               "guidance_scale": float(t.guidance_scale), "use_apg": bool(t.use_apg),
                               "apg_momentum": float(t.apg_momentum),
                               "apg_norm_threshold": float(t.apg_norm_threshold), "apg_eta": float(t.apg_eta),
                               "method": METHOD,
                               # the token space is the teacher's: its token files / ComfyUI tokens decode here too
                               "fingerprint": run.teacher.fingerprint}}


def export(run: DistillRun, state: LoopState) -> None:
    """``export.dir``: the teacher's pipeline (VAE, scheduler, AR / text models) with the student's FlexTok (EMA
    weights with ``export.use_ema``) and ``decoder_sampling`` recorded in ``model_index.json``."""
    weights = run.export_weights(run.raw.student.decoder.parameters(), "student.")
    if weights is None:
        return
    from ..flextok_core import FlexTokModel
    from ..pipelines import FlexTokPipeline

    model = FlexTokModel.from_config(run.raw.student.config)
    model.load_state_dict(weights)
    t = run.teacher
    pipe = FlexTokPipeline(vae=t.vae, flextok=model.eval(), scheduler=FlexTokPipeline.default_scheduler(),
                           ar_model=t.ar_model, text_encoder=t.text_encoder, tokenizer=t.tokenizer,
                           decoder_sampling=decoder_sampling(run))
    out_dir = run.export_dir()
    save_pretrained_atomic(pipe.to("cpu"), out_dir)
    logger.info("exported the %d-step student (%s weights) to %s", len(run.student_grid) - 1,
                "EMA" if run.export_ema else "raw", out_dir)


if __name__ == "__main__":
    main()
