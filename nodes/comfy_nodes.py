"""FlexTok nodes for ComfyUI (V3 schema, ``comfy_api.latest``), thin over :class:`FlexTokPipeline`.

Types: ``FLEXTOK_MODEL`` (:class:`FlexTokHandle`: the pipeline in a ComfyUI ModelPatcher) and ``FLEXTOK_TOKENS``
(:class:`FlexTokTokens`: ids + model identity + image size). Imported only inside ComfyUI.
"""
from __future__ import annotations

import logging
import os

import torch
from typing_extensions import override

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import ComfyExtension, io

from .core import (FIT_MODES, FIT_VALUES, FlexTokTokens, draw_label, find_model_folders, fit_images,
                   list_token_files, load_tokens, model_identity, parse_k_list, resolve_model_folder, save_tokens)

logger = logging.getLogger(__name__)

CATEGORY = "FlexTok"
MODEL_FOLDER = "flextok"
MAX_TOKENS = 256  # the largest N of any FlexTok model; the actual N is checked against the loaded model
MAX_SEED = 0xFFFFFFFFFFFFFFFF

# models/flextok/ under ComfyUI's models dir (follows --base-directory), added to whatever extra_model_paths.yaml
# already registered for "flextok" (that file is read before custom nodes load: add, never replace).
folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER), is_default=True)
folder_paths.folder_names_and_paths[MODEL_FOLDER] = (folder_paths.folder_names_and_paths[MODEL_FOLDER][0],
                                                     folder_paths.supported_pt_extensions)

FlexTokModelType = io.Custom("FLEXTOK_MODEL")
FlexTokTokensType = io.Custom("FLEXTOK_TOKENS")


# ----------------------------------------------------------------------------------------------- the model
class FlexTokModules(torch.nn.Module):
    """The pipeline's torch modules under one nn.Module, so one ModelPatcher moves/offloads them together."""

    def __init__(self, pipe):
        super().__init__()
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                self.add_module(name, component)


class FlexTokHandle:
    """What flows through a FLEXTOK_MODEL socket."""

    def __init__(self, pipe, name: str, folder: str, kind: str, identity: str, patcher):
        self.pipe, self.name, self.folder, self.kind = pipe, name, folder, kind
        self.identity, self.patcher = identity, patcher

    @property
    def num_registers(self) -> int:
        """N: the model's register count, the most tokens it makes per image."""
        return int(self.pipe.num_registers)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(x) for x in self.pipe.default_image_size)

    def ready(self):
        """Put the weights on the load device through ComfyUI's model management (frees or offloads other models
        when needed; /free and later loads can offload this one) and return the pipeline."""
        # force_full_load: FlexTok's layers are plain torch modules, which cannot run partially loaded.
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.pipe

    def make_tokens(self, ids: torch.Tensor, image_size) -> FlexTokTokens:
        return FlexTokTokens.of(ids, self.identity, self.name, tuple(image_size), self.num_registers,
                                int(self.pipe.flextok.vocab_size))

    def __repr__(self):
        return f"FlexTokHandle('{self.name}', {self.kind}, N={self.num_registers}, id={self.identity[:12]})"


def model_roots() -> list[str]:
    return folder_paths.get_folder_paths(MODEL_FOLDER)


def _pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device, prioritize_performance=False) else torch.float32


def load_flextok(name: str, device_choice: str = "default", dtype_choice: str = "auto") -> FlexTokHandle:
    from ..pipelines import FlexTokPipeline

    folder, kind = resolve_model_folder(model_roots(), name)
    if kind == "diffusers":
        pipe = FlexTokPipeline.from_pretrained(folder)
    else:
        pipe = FlexTokPipeline.from_official(folder)
    pipe.set_progress_bar_config(disable=True)
    identity = model_identity(pipe)  # before any dtype change: the id does not depend on the dtype
    load_device = torch.device("cpu") if device_choice == "cpu" else mm.get_torch_device()
    offload_device = torch.device("cpu") if device_choice == "cpu" else mm.unet_offload_device()
    dtype = _pick_dtype(dtype_choice, load_device)
    pipe.set_precision(dtype)  # as the CLI's --dtype: pipe.to(dtype), a float16 VAE stays float32
    modules = FlexTokModules(pipe).eval()
    patcher = comfy.model_patcher.ModelPatcher(modules, load_device=load_device, offload_device=offload_device)
    logger.info("FlexTok: loaded %s (%s format, N=%d, %s, id %s)", name, kind, pipe.num_registers, dtype, identity[:12])
    return FlexTokHandle(pipe, name, folder, kind, identity, patcher)


# ----------------------------------------------------------------------------------------------- helpers
def _progress_callback(total: int):
    """A diffusers ``callback_on_step_end`` that feeds ComfyUI's progress bar and honours /interrupt."""
    bar = comfy.utils.ProgressBar(total)

    def callback(pipe, step, timestep, callback_kwargs):
        bar.update(1)
        mm.throw_exception_if_processing_interrupted()
        return callback_kwargs

    return callback


def _generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed, seed+1, ...: image i gets the same noise whatever the batch."""
    return [torch.Generator("cpu").manual_seed((int(seed) + i) % (1 << 64)) for i in range(n)]


def _to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Pipeline output [B,3,H,W] in [0,1] -> ComfyUI IMAGE [B,H,W,3] float32 on the intermediate device."""
    return pixels.float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().to(mm.intermediate_device())


def _sampler(pipe, steps, guidance_scale) -> tuple[int, float]:
    """The widgets' sampler -> (steps, guidance): steps 0 and a negative guidance stand for the model's own
    settings (``pipe.decoder_sampling``: 25 steps at 7.5, or what a distilled decoder recorded, e.g. 4 at 1)."""
    steps, scale = pipe.resolve_decoder_sampling(int(steps) if int(steps) > 0 else None,
                                                 float(guidance_scale) if float(guidance_scale) >= 0 else None)
    return int(steps), float(scale)


def _decode(model: FlexTokHandle, tokens: FlexTokTokens, ids, steps, guidance_scale, use_apg, seed,
            generators=None) -> torch.Tensor:
    """ids: LongTensor [B,k] or a list of 1-D tensors (ragged) -> [B,3,H,W] in [0,1]."""
    # a distilled decoder shares its teacher's token space (frozen encoder, FSQ and VAE): it decodes its tokens too
    teacher = (model.pipe.decoder_sampling.get("distilled_from") or {}).get("fingerprint")
    if not (teacher and tokens.model_id == teacher):
        tokens.check_model(model.identity, model.name)
    pipe = model.ready()
    n = len(ids)
    h, w = tokens.image_size or model.image_size  # files that did not record a size: the model's default
    steps, guidance_scale = _sampler(pipe, steps, guidance_scale)
    out = pipe.detokenize(
        ids, num_inference_steps=steps, guidance_scale=guidance_scale, use_apg=bool(use_apg),
        height=h, width=w, generator=generators or _generators(seed, n), output_type="pt",
        callback_on_step_end=_progress_callback(steps))
    return out.images


def _check_choice(name: str, value, options, what: str = ""):
    """ComfyUI 0.3.75 checks V1 dropdown values against their options but not V3 (COMBO) ones: do it here, so a bad
    value is refused by /prompt (custom_validation_failed) instead of failing at run time."""
    if value is None or value in options:
        return True
    shown = list(options) if len(options) <= 20 else f"{list(options)[:20]} ... ({len(options)} in all)"
    return f"{name}: {value!r} is not {what or 'one of the options'}; available: {shown}"


# ----------------------------------------------------------------------------------------------- nodes
class FlexTokLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokLoad", display_name="Load FlexTok", category=CATEGORY,
            description="Load a FlexTok tokenizer from models/flextok/: a folder with model_index.json (diffusers "
                        "format) or config.json + model.safetensors (official release format).",
            inputs=[
                io.Combo.Input("model_name", options=find_model_folders(model_roots()),
                               tooltip="a folder under models/flextok/"),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="default: ComfyUI's device (GPU if any), offloaded by ComfyUI's model "
                                       "management; cpu: always on the CPU"),
                io.Combo.Input("dtype", options=["auto", "fp32", "bf16", "fp16"], default="auto",
                               tooltip="weights of the tokenizer (and AR model); auto = bf16 on GPUs that support it, "
                                       "else fp32. The VAE stays fp32"),
            ],
            outputs=[FlexTokModelType.Output(display_name="flextok_model")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None, device=None, dtype=None):
        for result in (_check_choice("model_name", model_name, find_model_folders(model_roots()),
                                     f"a FlexTok model folder in {model_roots()}"),
                       _check_choice("device", device, ["default", "cpu"]),
                       _check_choice("dtype", dtype, ["auto", "fp32", "bf16", "fp16"])):
            if result is not True:
                return result
        return True

    @classmethod
    def execute(cls, model_name, device, dtype) -> io.NodeOutput:
        return io.NodeOutput(load_flextok(model_name, device, dtype))


class FlexTokEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokEncode", display_name="FlexTok Encode", category=CATEGORY,
            description="Images -> all N coarse-to-fine tokens of each image.",
            inputs=[
                FlexTokModelType.Input("flextok_model"),
                io.Image.Input("image"),
                io.Combo.Input("fit", options=list(FIT_MODES), default="center-crop",
                               tooltip="center-crop: scale to cover the model's size and cut the middle; resize: "
                                       "squash to the model's size; none: keep the size (multiples of 16, at most the "
                                       "model's size) or fail"),
                io.Int.Input("posterior_seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="seed of the VAE posterior sample (used when the model samples it)"),
            ],
            outputs=[FlexTokTokensType.Output(display_name="tokens")],
        )

    @classmethod
    def validate_inputs(cls, fit=None):
        # workflows saved before the one fit vocabulary hold center_crop / stretch: accepted (fit_images maps them)
        return True if fit in FIT_VALUES else _check_choice("fit", fit, FIT_MODES)

    @classmethod
    def execute(cls, flextok_model, image, fit, posterior_seed) -> io.NodeOutput:
        pipe = flextok_model.ready()
        x = fit_images(image, flextok_model.image_size, fit, check=pipe._check_image_size)
        ids = _encode_each(pipe, x, posterior_seed)
        return io.NodeOutput(flextok_model.make_tokens(ids, tuple(x.shape[-2:])))


def _encode_each(pipe, x: torch.Tensor, posterior_seed: int, num_tokens: int | None = None) -> torch.Tensor:
    """Images [B,3,h,w] in [0,1] -> ids [B,k] on the CPU, image i tokenized alone with posterior seed + i."""
    bar = comfy.utils.ProgressBar(x.shape[0])
    ids = []
    for i, gen in enumerate(_generators(posterior_seed, x.shape[0])):
        mm.throw_exception_if_processing_interrupted()
        ids.append(pipe.tokenize(x[i:i + 1] * 2 - 1, num_tokens=num_tokens, generator=gen).cpu())
        bar.update(1)
    return torch.cat(ids)


AUTO_METRICS = ["psnr", "ssim", "lpips"]


class FlexTokAutoTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokAutoTokens", display_name="FlexTok Auto Tokens", category=CATEGORY,
            description="Images -> per image the fewest tokens whose reconstruction reaches a quality target (the "
                        "smallest candidate k that does; the largest when none does). Decode with the same steps, "
                        "guidance, APG and seed to see the images that were scored.",
            inputs=[
                FlexTokModelType.Input("flextok_model"),
                io.Image.Input("image"),
                io.Combo.Input("metric", options=AUTO_METRICS, default="psnr",
                               tooltip="psnr (dB) and ssim: higher is better; lpips (ST-LPIPS, needs the "
                                       "stlpips-pytorch wheel): lower is better"),
                io.Float.Input("target", default=20.0, min=-1.0, max=100.0, step=0.01, round=0.0001,
                               tooltip="the quality to reach: e.g. psnr 28 (dB), ssim 0.8 (-1..1), lpips 0.2 (>= 0)"),
                io.String.Input("candidates", default="",
                                tooltip="token counts to choose from, e.g. '1,4,16,64,256'; empty = 1, 2, 4, ... N"),
                io.Combo.Input("fit", options=list(FIT_MODES), default="center-crop",
                               tooltip="as in FlexTok Encode"),
                io.Int.Input("posterior_seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="seed of the VAE posterior sample, as in FlexTok Encode (image i: seed + i)"),
                *_sampling_inputs(),
            ],
            outputs=[FlexTokTokensType.Output(display_name="tokens"), io.String.Output(display_name="chosen_k")],
        )

    @classmethod
    def validate_inputs(cls, metric=None, target=None, candidates=None, fit=None):
        from ..pipelines.token_budget import METRICS, check_target

        checks = [_check_choice("metric", metric, AUTO_METRICS),
                  True if fit is None or fit in FIT_VALUES else _check_choice("fit", fit, FIT_MODES)]
        for result in checks:
            if result is not True:
                return result
        try:
            if metric is not None and target is not None:
                check_target(METRICS[metric], target)
        except ValueError as e:
            return f"{e} for metric {metric}"
        try:
            if candidates is not None and str(candidates).strip():
                parse_k_list(candidates, MAX_TOKENS)
        except ValueError as e:
            return "candidates: " + str(e).replace("k_values: ", "").replace("k_values", "the list")
        return True

    @classmethod
    def execute(cls, flextok_model, image, metric, target, candidates, fit, posterior_seed, steps, guidance_scale,
                use_apg, seed) -> io.NodeOutput:
        from ..pipelines.token_budget import check_candidates, choose_tokens

        n = flextok_model.num_registers
        ks = parse_k_list(candidates, n) if str(candidates).strip() else None
        ks = check_candidates(ks, n)
        pipe = flextok_model.ready()
        x = fit_images(image, flextok_model.image_size, fit, check=pipe._check_image_size)
        ids = _encode_each(pipe, x, posterior_seed, num_tokens=ks[-1])
        # image i's noise: seed + i at every candidate, as FlexTok Decode seeds image i
        steps, guidance_scale = _sampler(pipe, steps, guidance_scale)
        budget = choose_tokens(pipe, x * 2 - 1, float(target), metric, ks, ids=ids,
                               generator=_generators(seed, x.shape[0]), num_inference_steps=steps,
                               guidance_scale=guidance_scale, use_apg=bool(use_apg),
                               callback_on_step_end=_progress_callback(steps * len(ks)))
        tokens = FlexTokTokens.from_rows(
            [t.cpu() for t in budget.tokens], flextok_model.identity, model_name=flextok_model.name,
            image_sizes=[tuple(x.shape[-2:])] * x.shape[0], num_registers=n,
            vocab_size=int(pipe.flextok.vocab_size), extra={"auto": dict(budget.summary(), rows=budget.per_image())})
        return io.NodeOutput(tokens, _chosen_text(budget))


def _chosen_text(budget) -> str:
    """'image 0: k=4 (psnr 28.31 >= 28)' per image, then the mean."""
    op = ">=" if budget.higher_is_better else "<="
    lines = [f"image {i}: k={k} ({budget.metric} {score:.4g}"
             + (f" {op} {budget.target:g})" if reached else f", target {budget.target:g} not reached)")
             for i, (k, score, reached) in enumerate(zip(budget.num_tokens, budget.scores, budget.reached))]
    summary = budget.summary()
    lines.append(f"mean k {summary['mean_tokens']:.2f} of candidates {budget.candidates}; "
                 f"{summary['mean_decoder_passes']:.2f} decoder passes per image")
    return "\n".join(lines)


class FlexTokTruncate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokTruncate", display_name="FlexTok Truncate Tokens", category=CATEGORY,
            description="Keep the first k tokens (the coarsest k) of every image.",
            inputs=[
                FlexTokTokensType.Input("tokens"),
                io.Int.Input("k", default=16, min=1, max=MAX_TOKENS,
                             tooltip="tokens to keep per image: 1..(tokens in the input). Images with fewer tokens "
                                     "(ragged token files, e.g. a per-image k) keep all of theirs"),
            ],
            outputs=[FlexTokTokensType.Output(display_name="tokens")],
        )

    @classmethod
    def execute(cls, tokens, k) -> io.NodeOutput:
        return io.NodeOutput(tokens.truncate(k))


def _sampling_inputs():
    return [
        # 0 / -1 = the loaded model's own sampler, so a distilled model decodes in its few steps without guidance
        # unless overridden; explicit values (every existing workflow's) behave as before
        io.Int.Input("steps", default=0, min=0, max=1000,
                     tooltip="rectified-flow Euler steps; 0 = the model's default (25, or the few steps a distilled "
                             "decoder was trained for, e.g. 4)"),
        io.Float.Input("guidance_scale", default=-1.0, min=-1.0, max=30.0, step=0.1, round=0.01,
                       tooltip="classifier-free guidance; 1 = off (half the compute); -1 = the model's default "
                               "(7.5, or 1 for a distilled decoder, which has the guidance built in)"),
        io.Boolean.Input("use_apg", default=True, tooltip="adaptive projected guidance instead of plain CFG"),
        io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                     tooltip="noise seed; image i of a batch uses seed + i"),
    ]


class FlexTokDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokDecode", display_name="FlexTok Decode", category=CATEGORY,
            description="Tokens (any number 1..N) -> images, with the model that made the tokens.",
            inputs=[FlexTokModelType.Input("flextok_model"), FlexTokTokensType.Input("tokens"), *_sampling_inputs()],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, flextok_model, tokens, steps, guidance_scale, use_apg, seed) -> io.NodeOutput:
        pixels = _decode(flextok_model, tokens, tokens.decode_input(), steps, guidance_scale, use_apg, seed)
        return io.NodeOutput(_to_image(pixels))


class FlexTokCoarseToFine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokCoarseToFine", display_name="FlexTok Coarse-to-Fine", category=CATEGORY,
            description="Decode the first k tokens for several k: a labelled batch (per image, one frame per k) and a "
                        "side-by-side strip per image.",
            inputs=[
                FlexTokModelType.Input("flextok_model"), FlexTokTokensType.Input("tokens"),
                io.String.Input("k_values", default="1,4,16,64,256",
                                tooltip="comma-separated token counts, each in 1..(tokens in the input; for "
                                        "ragged tokens, in the shortest image)"),
                *_sampling_inputs(),
                io.Boolean.Input("label", default=True, tooltip="write k=... on each frame"),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Image.Output(display_name="strip")],
        )

    @classmethod
    def validate_inputs(cls, k_values=None):  # no **kwargs: ComfyUI then still checks min/max of the other inputs
        if k_values is None:  # linked: checked when the node runs
            return True
        try:
            parse_k_list(k_values, MAX_TOKENS)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, flextok_model, tokens, k_values, steps, guidance_scale, use_apg, seed, label) -> io.NodeOutput:
        ks = parse_k_list(k_values, flextok_model.num_registers, tokens.min_tokens)  # every image has each k
        b = tokens.batch_size
        seqs = [tokens.ids[i, :k] for i in range(b) for k in ks]  # image-major: image 0 at every k, then image 1
        gens = [_generators(int(seed) + i, 1)[0] for i in range(b) for _ in ks]  # image i: the same noise at every k
        frames = _to_image(_decode(flextok_model, tokens, seqs, steps, guidance_scale, use_apg, seed, gens))
        if label:
            frames = torch.stack([draw_label(f, f"k={ks[j % len(ks)]}") for j, f in enumerate(frames)])
        h, w = frames.shape[1:3]
        strip = frames.reshape(b, len(ks), h, w, 3).permute(0, 2, 1, 3, 4).reshape(b, h, len(ks) * w, 3)
        return io.NodeOutput(frames, strip.contiguous())


class FlexTokSaveTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokSaveTokens", display_name="FlexTok Save Tokens", category=CATEGORY,
            description="Write tokens (ids + model identity + image size) as .safetensors into ComfyUI's output "
                        "folder.",
            is_output_node=True,
            inputs=[
                FlexTokTokensType.Input("tokens"),
                io.String.Input("filename_prefix", default="flextok/tokens",
                                tooltip="path under the output folder; a counter and .safetensors are appended"),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, tokens, filename_prefix) -> io.NodeOutput:
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        while os.path.exists(path := os.path.join(folder, f"{name}_{counter:05}_.safetensors")):
            counter += 1
        save_tokens(tokens, path)
        entry = {"filename": os.path.basename(path), "subfolder": subfolder, "type": "output"}
        text = f"{os.path.join(subfolder, entry['filename'])}: {tokens!r}"
        return io.NodeOutput(ui={"flextok_tokens": [entry], "text": [text]})


def _token_file_options() -> list[str]:
    inputs = list_token_files(folder_paths.get_input_directory())
    outputs = [f"{p} [output]" for p in list_token_files(folder_paths.get_output_directory())]
    return inputs + outputs


class FlexTokLoadTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokLoadTokens", display_name="FlexTok Load Tokens", category=CATEGORY,
            description="Read a FlexTok token file (from FlexTok Save Tokens or `flextok tokenize`; older versions "
                        "too) from the input folder or (marked [output]) the output folder.",
            inputs=[io.Combo.Input("tokens_file", options=_token_file_options(),
                                   tooltip="a FlexTok token .safetensors file")],
            outputs=[FlexTokTokensType.Output(display_name="tokens")],
        )

    @classmethod
    def validate_inputs(cls, tokens_file=None):
        return _check_choice("tokens_file", tokens_file, _token_file_options(),
                             "a FlexTok token file in the input folder (or, marked [output], the output folder)")

    @classmethod
    def fingerprint_inputs(cls, tokens_file):
        path = folder_paths.get_annotated_filepath(tokens_file)
        try:
            st = os.stat(path)
        except OSError:
            return float("nan")  # never equal: re-run and report the missing file
        return f"{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, tokens_file) -> io.NodeOutput:
        path = folder_paths.get_annotated_filepath(tokens_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"token file {tokens_file!r} not found ({path})")
        return io.NodeOutput(load_tokens(path))


def _class_label(ar_model, text: str):
    """'207' -> 207 (range-checked), any other text -> a class name (the pipeline maps it through id2label)."""
    text = str(text).strip()
    if not text:
        raise ValueError("class_label is empty: give a class id (e.g. 207) or a class name, or a prompt")
    try:
        label = int(text)
    except ValueError:
        return text
    num_classes = getattr(getattr(ar_model, "config", None), "num_classes", None)
    if label < 0 or (num_classes and label >= int(num_classes)):
        raise ValueError(f"class_label {label} is out of range: this AR model has classes 0..{int(num_classes) - 1}"
                         if num_classes else f"class_label must be >= 0, got {label}")
    return label


class FlexTokARGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FlexTokARGenerate", display_name="FlexTok AR Generate", category=CATEGORY,
            description="Sample tokens with the pipeline's autoregressive model (class-conditional or from a prompt); "
                        "decode them with FlexTok Decode.",
            inputs=[
                FlexTokModelType.Input("flextok_model"),
                io.String.Input("class_label", default="207",
                                tooltip="class id or class name (class-conditional models); ignored when prompt "
                                        "is set"),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="text prompt (text-conditional models); empty = use class_label"),
                io.Int.Input("num_tokens", default=256, min=1, max=MAX_TOKENS, tooltip="tokens to generate: 1..N"),
                io.Float.Input("ar_guidance_scale", default=4.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="classifier-free guidance of the AR model; 1 = off"),
                io.Float.Input("temperature", default=1.0, min=0.01, max=5.0, step=0.01),
                io.Int.Input("top_k", default=0, min=0, max=64000, tooltip="keep the k most likely tokens; 0 = off"),
                io.Float.Input("top_p", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="nucleus sampling mass; 1 = off"),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True),
                io.Int.Input("batch_size", default=1, min=1, max=64),
            ],
            outputs=[FlexTokTokensType.Output(display_name="tokens")],
        )

    @classmethod
    def execute(cls, flextok_model, class_label, prompt, num_tokens, ar_guidance_scale, temperature, top_k, top_p,
                seed, batch_size) -> io.NodeOutput:
        pipe = flextok_model.pipe
        ar_model = getattr(pipe, "ar_model", None)
        if ar_model is None:
            raise ValueError(
                f"FlexTok model '{flextok_model.name}' has no AR model (ar_model), so it cannot generate tokens; "
                "load a model folder that includes one (model_index.json with an ar_model entry)")
        if not hasattr(pipe, "generate_tokens"):
            raise RuntimeError("this FlexTokPipeline has no generate_tokens(); update flextok_kit")
        limit = flextok_model.num_registers
        max_ar = getattr(getattr(ar_model, "config", None), "max_tokens", None)
        if max_ar:
            limit = min(limit, int(max_ar))
        if not 1 <= num_tokens <= limit:
            raise ValueError(f"num_tokens={num_tokens} is out of range: model '{flextok_model.name}' generates at most "
                             f"{limit} tokens (N={flextok_model.num_registers}); use 1..{limit}")
        prompt = (prompt or "").strip()
        if prompt:
            conditioning = {"prompt": [prompt] * batch_size, "class_labels": None}
        else:
            conditioning = {"prompt": None, "class_labels": [_class_label(ar_model, class_label)] * batch_size}
        pipe = flextok_model.ready()
        mm.throw_exception_if_processing_interrupted()
        bar = comfy.utils.ProgressBar(1)  # generate_tokens has no per-token callback
        ids = pipe.generate_tokens(**conditioning, num_tokens=int(num_tokens),
                                   ar_guidance_scale=float(ar_guidance_scale), temperature=float(temperature),
                                   top_k=int(top_k), top_p=float(top_p),
                                   # CPU generators, sample i seeded seed + i (as Decode): the same tokens on
                                   # any device and whatever the batch size; the draws happen on the CPU
                                   generator=_generators(seed, batch_size))
        bar.update(1)
        if ids.dim() != 2 or tuple(ids.shape) != (batch_size, num_tokens):
            raise RuntimeError(f"generate_tokens returned shape {tuple(ids.shape)}, "
                               f"expected [{batch_size}, {num_tokens}]")
        return io.NodeOutput(flextok_model.make_tokens(ids.cpu(), flextok_model.image_size))


NODES = [FlexTokLoad, FlexTokEncode, FlexTokTruncate, FlexTokDecode, FlexTokCoarseToFine, FlexTokSaveTokens,
         FlexTokLoadTokens, FlexTokARGenerate, FlexTokAutoTokens]


class FlexTokExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FlexTokExtension:
    return FlexTokExtension()
