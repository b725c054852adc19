"""Few-step decoder distillation (training/distill_decoder.py) end to end on a tiny teacher (CPU, ~20 s).

A tiny teacher pipeline is distilled for a few steps from the committed config ``distill_tiny`` (25-step APG-guided
teacher -> 4-step student). Checked: the loss falls; the export loads, keeps the teacher's tokenizer (same tokens)
and records its sampler in model_index.json; by default it decodes in exactly 4 decoder passes of one
(conditional) batch each; explicit settings still override; the teacher folder keeps 25 guided steps (50 passes);
a second run resumes from the checkpoint; and the trajectory read-off is the teacher's Euler solution.
"""
import json

import numpy as np
import pytest
import torch

from flextok_kit.training.data import write_image_folder
from flextok_kit.training.utils import read_metrics

RES = 32


@pytest.fixture(autouse=True)
def _one_thread_fresh_accelerate(one_thread_fresh_accelerate):
    """The distillation runs in-process (conftest.one_thread_fresh_accelerate)."""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny randomly initialised FlexTok pipeline (8 registers, 32 px) and an image folder."""
    from diffusers import AutoencoderKL

    from flextok_kit.pipelines import FlexTokPipeline
    from flextok_kit.training.models import build_flextok

    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:RES, 0:RES] / RES
    imgs = [np.clip(np.stack([200 * xx, 150 * yy, np.full_like(xx, 60 * (i % 3))], -1)
                    + rng.normal(0, 20, (RES, RES, 3)), 0, 255).astype(np.uint8) for i in range(12)]
    write_image_folder(root / "images", imgs, [i % 3 for i in range(12)], ["a", "b", "c"])
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, norm_num_groups=8,
                        layers_per_block=1)
    flextok = build_flextok(dict(grid_size=(2, 2), num_registers=8, encoder_dim=32, encoder_depth=1,
                                 encoder_head_dim=16, decoder_dim=32, decoder_depth=2, decoder_head_dim=16))
    with torch.no_grad():  # adaLN-zero starts at a zero velocity: give the teacher a non-trivial one
        for p in flextok.decoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    FlexTokPipeline(vae, flextok, FlexTokPipeline.default_scheduler()).save_pretrained(root / "teacher")
    return root


def distill(teacher_root, out, *extra):
    from flextok_kit.training.distill_decoder import main

    return main(["--config", "distill_tiny", f"teacher.path={teacher_root / 'teacher'}",
                 f"data.path={teacher_root / 'images'}", f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "distill"
    distill(teacher, out)
    return out


def count_passes(pipe):
    """Wrap the decoder: -> list of the batch sizes of its forward calls."""
    calls = []
    forward = pipe.flextok.decoder.forward

    def counted(x_t, *args, **kwargs):
        out = forward(x_t, *args, **kwargs)
        calls.append(out.shape[0])  # rows out: B per conditional pass, 2B when the unconditional one is batched in
        return out

    pipe.flextok.decoder.forward = counted
    return calls


def test_loss_falls_and_export_records_its_sampler(teacher, distilled):
    assert len([m for m in read_metrics(distilled) if "loss" in m]) == 6
    evals = [m for m in read_metrics(distilled) if "eval/loss" in m]  # fixed batch, k and noise
    assert evals[-1]["eval/loss"] < 0.7 * evals[0]["eval/loss"], evals
    index = json.loads((distilled / "export" / "model_index.json").read_text())
    sampling = index["decoder_sampling"]
    assert sampling["num_inference_steps"] == 4 and sampling["guidance_scale"] == 1.0
    assert sampling["distilled_from"]["num_inference_steps"] == 25
    assert sampling["distilled_from"]["guidance_scale"] == 3.0 and sampling["distilled_from"]["use_apg"] is True
    from flextok_kit.pipelines import FlexTokPipeline

    assert sampling["distilled_from"]["fingerprint"] == FlexTokPipeline.from_pretrained(teacher / "teacher").fingerprint


def test_export_decodes_in_the_configured_passes_by_default(teacher, distilled):
    from flextok_kit.pipelines import FlexTokPipeline

    student = FlexTokPipeline.from_pretrained(distilled / "export")
    reference = FlexTokPipeline.from_pretrained(teacher / "teacher")
    assert student.decoder_sampling["num_inference_steps"] == 4
    assert reference.decoder_sampling == {"num_inference_steps": 25, "guidance_scale": 7.5}
    images = torch.rand(3, 3, RES, RES) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ids = student.tokenize(images, generator=g())
    assert torch.equal(ids, reference.tokenize(images, generator=g()))  # frozen encoder + FSQ: one token space
    # the decoder weights did change
    assert not torch.equal(student.flextok.decoder.proj_out.weight, reference.flextok.decoder.proj_out.weight)

    calls = count_passes(student)
    out = student.detokenize(ids[:, :4], generator=g(), output_type="np").images
    assert calls == [3] * 4, calls                           # 4 steps, one conditional pass each
    assert out.shape == (3, RES, RES, 3) and np.isfinite(out).all()
    calls.clear()
    student(image=images, num_tokens=2, generator=g(), output_type="latent")
    assert calls == [3] * 4, calls                           # __call__ uses the same defaults
    calls.clear()
    student.detokenize(ids, num_inference_steps=3, guidance_scale=2.0, generator=g(), output_type="latent")
    assert calls == [6] * 3, calls                           # explicit settings override (guided: 2B rows)

    calls = count_passes(reference)
    reference.detokenize(ids, generator=g(), output_type="latent")
    assert calls == [6] * 25, calls                          # the teacher: 25 guided steps, 50 passes per image


def test_cli_decodes_teacher_tokens_in_the_students_steps(teacher, distilled, tmp_path):
    """flextok tokenize (teacher) -> flextok detokenize (student, no --steps/--guidance): accepted (one token space),
    decoded with the student's recorded sampler; another model's tokens are still refused."""
    import PIL.Image

    from flextok_kit import cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    PIL.Image.fromarray(np.full((RES, RES, 3), 90, np.uint8)).save(folder / "a.png")
    tokens = tmp_path / "t.safetensors"
    assert cli.main(["tokenize", str(folder), "--model", str(teacher / "teacher"), "--out", str(tokens),
                     "--quiet"]) == 0
    from flextok_kit.pipelines import pipeline_flextok

    seen = []
    detokenize = pipeline_flextok.FlexTokPipeline.detokenize

    def spy(self, *args, **kwargs):
        seen.append((kwargs.get("num_inference_steps"), kwargs.get("guidance_scale")))
        return detokenize(self, *args, **kwargs)

    pipeline_flextok.FlexTokPipeline.detokenize = spy
    try:
        assert cli.main(["detokenize", str(tokens), "--model", str(distilled / "export"), "--out",
                         str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        pipeline_flextok.FlexTokPipeline.detokenize = detokenize
    assert seen == [(4, 1.0)], seen
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    own = tmp_path / "own.safetensors"
    assert cli.main(["tokenize", str(folder), "--model", str(distilled / "export"), "--out", str(own), "--quiet"]) == 0
    assert cli.main(["detokenize", str(own), "--model", str(teacher / "teacher"), "--out", str(tmp_path / "o2"),
                     "--quiet"]) != 0  # the teacher does not claim the student's identity


def test_resume_continues_from_the_checkpoint(teacher, distilled, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(distilled, out)
    distill(teacher, out, "max_steps=8")
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[6:] == [7, 8], steps


def test_trajectory_read_off_is_the_euler_solution():
    from flextok_kit.training.distill_decoder import euler_path_at
    from flextok_kit.flextok_core.sampling import flow_timesteps

    grid = flow_timesteps(25) + [0.0]
    path = torch.randn(26, 2, 3)
    # on the teacher's grid (S = 5 divides 25): exactly the teacher's points
    assert torch.allclose(euler_path_at(path, grid, flow_timesteps(5) + [0.0]), path[::5])
    # between grid points (t = 0.75 lies between 0.76 and 0.72): the Euler step's straight line
    x = euler_path_at(path, grid, [0.75])[0]
    assert torch.allclose(x, path[6] + 0.25 * (path[7] - path[6]), atol=1e-6)


def test_bad_settings_are_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="student.num_inference_steps"):
        distill(teacher, tmp_path / "bad", "student.num_inference_steps=25")
    with pytest.raises(ValueError, match="teacher.path"):
        distill(teacher, tmp_path / "bad2", f"teacher.path={tmp_path}")


@pytest.mark.parametrize("name", ["photo_tokenizer", "fashion_ar"])
def test_shipped_distilled_demo_models(name):
    """demo_models/<name>_distilled: a full pipeline folder (no symlinks), float16 weights <= 5 MB each, a model
    card, the teacher's encoder, FSQ, VAE (and AR model) unchanged, 4 steps without guidance by default."""
    from flextok_kit import demo
    from flextok_kit.pipelines import FlexTokPipeline

    teacher_dir, folder = demo.HERE / "demo_models" / name, demo.HERE / "demo_models" / f"{name}_distilled"
    assert (folder / "model_index.json").is_file() and (folder / "README.md").is_file()
    assert not [p for p in folder.rglob("*") if p.is_symlink()]
    for weights in folder.rglob("*.safetensors"):
        assert weights.stat().st_size <= 5e6, f"{weights}: {weights.stat().st_size / 1e6:.1f} MB"
    student, teacher = FlexTokPipeline.from_pretrained(folder), FlexTokPipeline.from_pretrained(teacher_dir)
    assert student.decoder_sampling["num_inference_steps"] == 4 and student.decoder_sampling["guidance_scale"] == 1
    assert student.decoder_sampling["distilled_from"]["guidance_scale"] == 3.0
    frozen = [("vae", student.vae, teacher.vae), ("encoder", student.flextok.encoder, teacher.flextok.encoder)]
    if teacher.ar_model is not None:
        frozen.append(("ar_model", student.ar_model, teacher.ar_model))
    for part, a, b in frozen:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    calls = count_passes(student)
    ids = torch.zeros(2, 3, dtype=torch.long)
    student.detokenize(ids, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert calls == [2] * 4, calls
