"""The ``flextok`` command line: convert, tokenize, detokenize, reconstruct, generate, eval, info.

    flextok convert EPFL-VILAB/flextok_d18_d18_in1k out/flextok_d18_d18
    flextok tokenize photos/ --model out/flextok_d18_d18 --out tokens.safetensors
    flextok detokenize tokens.safetensors --model out/flextok_d18_d18 --num-tokens 16 --out decoded/
    flextok reconstruct photo.jpg --model out/flextok_d18_d18 --tokens 1 4 16 64 256 --out grid.png
    flextok generate --model my_ar_pipeline --class 207 --class "tabby cat" --num-tokens 16 64 --out samples.png
    flextok eval photos/ --model out/flextok_d18_d18 --json eval.json --plot eval.png
    flextok info out/flextok_d18_d18
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from . import images as image_layer
from .images import FITS, find_images, load_image, to_tensor


class CLIError(Exception):
    """A problem with the user's input; printed without a traceback."""


# -- images -----------------------------------------------------------------------------------------
def fit_target(pipe, fit: str, size: int | None) -> int | None:
    """The square side ``--fit``/``--size`` fit images to (None for ``--fit none``), or a CLIError saying which sizes
    the model takes."""
    if image_layer.fit_mode(fit) == "none":
        return None
    max_side = min(pipe.default_image_size)
    unit = pipe.vae_scale_factor * pipe.flextok.config.patch_size
    target = size or max_side
    if target % unit or target > max_side:
        raise CLIError(f"--size {target}: must be a multiple of {unit} and at most {max_side}")
    return target


def fitted_size(w: int, h: int, pipe, fit: str, size: int | None, path: Path) -> tuple[int, int]:
    """(width, height) that ``--fit`` makes of a w x h image, or a CLIError saying which sizes the model takes."""
    target = fit_target(pipe, fit, size)
    if target is None:
        max_h, max_w = pipe.default_image_size
        unit = pipe.vae_scale_factor * pipe.flextok.config.patch_size
        if w % unit or h % unit or w > max_w or h > max_h:
            raise CLIError(f"{path}: {w}x{h} is not a size this model takes (width and height must be multiples of "
                           f"{unit}, at most {max_w}x{max_h}); pass --fit center-crop or --fit resize")
    return image_layer.fitted_size(w, h, target, fit)


def probe_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as :func:`load_image` will deliver it (EXIF rotation applied), from the header alone: a
    cheap pass over every input that refuses unreadable files and sizes before anything is written."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # these EXIF orientations turn the image by 90 degrees


def load_fitted(path: Path, pipe, fit: str, size: int | None):
    """The image at ``path``, fitted as ``--fit`` says (:func:`.images.fit_image`), or a CLIError explaining which
    sizes the model can take."""
    im = load_image(path)
    w, h = fitted_size(*im.size, pipe, fit, size, path)
    return image_layer.fit_image(im, (h, w), fit)


# -- model ------------------------------------------------------------------------------------------
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str) -> str:
    """``--device``: ``auto`` = cuda, then mps (Apple silicon), then cpu; any other name as given."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> str:
    """``--dtype`` of the models (``FlexTokPipeline.set_precision``; a float16 VAE runs in float32): ``auto`` =
    float32 on the CPU (the same outputs on every CPU; pass bfloat16 for speed on CPUs with AMX), on a GPU bfloat16
    where the device supports it, else float16."""
    import torch

    if name != "auto":
        return name
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "mps":  # bfloat16 needs macOS 14 on Apple silicon
        newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
        return "bfloat16" if newer is not None and newer(14, 0) else "float16"
    return "float32"


def load_pipeline(args):
    import torch

    from .pipelines import FlexTokPipeline

    if not args.model:
        raise CLIError("no model given: pass --model <folder or hub id> (or set FLEXTOK_MODEL)")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": the commands show their own progress
    try:
        pipe = FlexTokPipeline.load(args.model)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from e
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)  # the resolved name is what token files record
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe.set_precision(dtype)  # the same path as pipe.to(dtype) (the VAE stays float32 under float16)
    try:
        pipe.to(args.device)
    except (RuntimeError, AssertionError) as e:  # torch's "not compiled with CUDA", an unknown device string
        raise CLIError(f"--device {args.device}: {e}") from e
    model_decoder_defaults(args, pipe)
    return pipe


def model_decoder_defaults(args, pipe) -> None:
    """Decoder settings left out on the command line (None) become the model's own (``pipe.decoder_sampling``: a
    distilled decoder's few steps without guidance, else 25 steps at guidance 7.5), so what token files and tables
    record is what ran."""
    if getattr(args, "steps", 0) is None:
        args.steps = pipe.decoder_sampling["num_inference_steps"]
    for name in ("guidance", "gen_guidance"):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, pipe.decoder_sampling["guidance_scale"])


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def grouped_by_size(paths, pipe, args):
    """Load and fit images, then group them by size (one batch holds one size)."""
    groups: dict = {}
    for path in paths:
        im = load_fitted(path, pipe, args.fit, args.size)
        groups.setdefault(im.size, []).append((path, im))
    return groups


# -- commands ---------------------------------------------------------------------------------------
def cmd_convert(args):
    from .flextok_core import LICENSE_NOTICE
    from .pipelines import FlexTokPipeline

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    try:
        pipe = FlexTokPipeline.from_official(args.source, vae=args.vae, sample_posterior=args.sample_posterior)
    except ValueError as e:
        raise CLIError(str(e)) from e
    pipe.save_pretrained(out)
    (out / "WEIGHTS_LICENSE_NOTICE.txt").write_text(LICENSE_NOTICE + "\n" + f"Converted from {args.source}.\n")
    print(f"wrote {out} (load with FlexTokPipeline.from_pretrained({str(out)!r}))")


def cmd_tokenize(args):
    from tqdm import tqdm

    auto = checked_auto(args)  # before the model loads: a bad --auto costs nothing
    pipe = load_pipeline(args)
    if auto is not None:  # the model's decoder defaults, now known
        auto.update(steps=args.steps, guidance=args.guidance)
    pipe.set_progress_bar_config(disable=True)
    n = pipe.num_registers
    k = n if args.num_tokens is None else args.num_tokens
    if not 1 <= k <= n:
        raise CLIError(f"--num-tokens must be in 1..{n}")
    if auto is not None:
        from .pipelines.token_budget import check_candidates

        try:
            auto["candidates"] = check_candidates(args.candidates, n)
        except ValueError as e:
            raise CLIError(f"--candidates: {e}") from None
        k = auto["candidates"][-1]  # tokenized up to the largest candidate, then cut per image
    out = Path(args.out)
    sharded = out.suffix != ".safetensors"
    if not sharded and (args.shard_size or args.resume):
        raise CLIError(f"--out {out}: --shard-size and --resume write a folder of shards; give --out a folder name "
                       "(without .safetensors)")
    paths = find_images(args.inputs)
    # every input is opened (header only) and size-checked before anything is tokenized or written
    sizes = [fitted_size(*probe_image_size(p), pipe, args.fit, args.size, p) for p in paths]
    job = TokenizeJob(pipe, args, paths, sizes, k, auto)
    shape = f"{len(paths)} x {k}" if auto is None else f"{len(paths)} rows of (per image) 1..{k}"
    with tqdm(total=len(paths), desc="tokenize", unit="img", disable=args.quiet) as job.bar:
        if not sharded:
            job.tokens(0, len(paths)).save(out)
            print(f"wrote {shape} token ids to {out}")
        else:
            done = write_token_shards(job, out, args.shard_size or DEFAULT_SHARD_SIZE, args.resume)
            print(f"wrote {shape} token ids to {out}/ ({done['written']} shard(s) written, {done['skipped']} "
                  "already done)")
    if auto is not None:
        print(auto_summary(out, sharded))


def checked_auto(args) -> dict | None:
    """``--auto METRIC:TARGET`` (with ``--candidates``, ``--search``) checked before anything runs; None without."""
    if args.auto is None:
        if args.candidates or args.search:
            raise CLIError("--candidates and --search go with --auto METRIC:TARGET (e.g. --auto psnr:28)")
        return None
    if args.num_tokens is not None:
        raise CLIError("--auto chooses each image's number of tokens: leave out --num-tokens (--candidates limits "
                       "the choice)")
    from .pipelines.token_budget import METRICS, parse_auto

    try:
        metric, target = parse_auto(args.auto)
    except (ValueError, ImportError) as e:
        raise CLIError(str(e)) from None
    return {"metric": metric, "target": target, "higher_is_better": METRICS[metric].higher_is_better,
            "search": args.search or "ascending", "steps": args.steps, "guidance": args.guidance,
            "apg": not args.no_apg}


def auto_summary(out: Path, sharded: bool) -> str:
    """What ``--auto`` chose, from the written file(s): mean k, how many images reached the target, the histogram of
    the chosen k and the decoder passes per image."""
    from .token_files import load, shard_files

    rows, auto = [], {}
    for path in (shard_files(out) if sharded else [out]):
        auto = load(path).extra["auto"]
        rows += auto["rows"]
    ks, cands = [r["k"] for r in rows], auto["candidates"]
    op = ">=" if auto["higher_is_better"] else "<="
    lines = [f"auto {auto['metric']} {op} {auto['target']:g}: mean k {sum(ks) / len(ks):.2f} (candidates "
             f"{', '.join(map(str, cands))}); {sum(r['reached'] for r in rows)} of {len(rows)} image(s) reach the "
             f"target, the others keep {cands[-1]} tokens",
             f"decoder passes per image: mean {sum(r['decoder_passes'] for r in rows) / len(rows):.2f} "
             f"({auto['search']} search over {len(cands)} candidates)", "chosen k   images"]
    width = max(ks.count(k) for k in cands)
    lines += [f"{k:8d}   {ks.count(k):6d}  {'#' * round(40 * ks.count(k) / width)}".rstrip() for k in cands]
    return "\n".join(lines)


DEFAULT_SHARD_SIZE = 1000


class TokenizeJob:
    """Images -> a TokenFile for any range of them, streamed: at most one batch of images in memory at a time.

    Rows keep the order of the inputs; inside a range, images are batched by size (one tensor per batch). The
    posterior noise of a range is seeded from (--seed, its start), so a shard rewritten after an interrupt gets
    the same ids."""

    def __init__(self, pipe, args, paths, sizes, k, auto: dict | None = None):
        self.pipe, self.args, self.paths, self.sizes, self.k = pipe, args, paths, sizes, k
        self.auto, self.chosen = auto, {}  # --auto settings; row -> what the search chose for it
        self.fingerprint = pipe.fingerprint
        self.bar = None
        # what determines the ids: a shard folder is resumed only with the same of all of these
        files = hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()
        self.settings = {"model_fingerprint": self.fingerprint, "num_tokens": k, "num_files": len(paths),
                         "files_sha256": files, "fit": args.fit, "size": args.size,
                         "deterministic": args.deterministic, "seed": args.seed, "batch_size": args.batch_size,
                         "dtype": args.dtype}
        if auto is not None:  # (only then: shard folders of earlier fixed-k runs keep their fingerprint)
            self.settings["auto"] = auto

    def tokens(self, start: int, end: int):
        import torch

        from .token_files import TokenFile

        args = self.args
        by_size: dict = {}
        for i in range(start, end):
            by_size.setdefault(self.sizes[i], []).append(i)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + start)
        rows, image_sizes = {}, {}
        for members in by_size.values():
            for batch in batches(members, args.batch_size):
                loaded = [(i, load_fitted(self.paths[i], self.pipe, args.fit, args.size)) for i in batch]
                for size in dict.fromkeys(im.size for _, im in loaded):  # one tensor per size, should a probe be off
                    part = [(i, im) for i, im in loaded if im.size == size]
                    x = to_tensor([im for _, im in part])
                    ids = self.pipe.tokenize(x, num_tokens=self.k, generator=generator,
                                             sample_posterior=False if args.deterministic else None)
                    ids = ids.cpu() if self.auto is None else self.auto_rows([i for i, _ in part], x, ids)
                    for (i, _), row in zip(part, ids):
                        rows[i], image_sizes[i] = row, (size[1], size[0])
                if self.bar is not None:
                    self.bar.update(len(batch))
        order = range(start, end)
        extra = {"tokenize": {key: self.settings[key] for key in ("fit", "size", "deterministic", "seed", "dtype")}}
        if self.auto is not None:  # per row (in this file's order): the chosen k, its score, the decoder passes
            extra["auto"] = dict(self.auto, rows=[self.chosen[i] for i in order])
        return TokenFile.from_rows([rows[i] for i in order], self.fingerprint, model_name=str(args.model),
                                   sources=[str(self.paths[i]) for i in order],
                                   image_sizes=[image_sizes[i] for i in order], num_registers=self.pipe.num_registers,
                                   vocab_size=self.pipe.flextok.vocab_size, extra=extra)

    def auto_rows(self, indices, x, ids) -> list:
        """--auto: each image's shortest prefix reaching the target. Row i's noise is seeded ``--seed + i`` at every
        candidate, as ``flextok detokenize --seed`` seeds row i: detokenizing the file with the same --seed, --steps,
        --guidance and APG setting gives the images that were scored."""
        import torch

        from .pipelines.token_budget import choose_tokens

        args, auto = self.args, self.auto
        budget = choose_tokens(self.pipe, x, auto["target"], auto["metric"], auto["candidates"], search=auto["search"],
                               ids=ids, generator=[torch.Generator().manual_seed(args.seed + i) for i in indices],
                               num_inference_steps=args.steps, guidance_scale=args.guidance, use_apg=not args.no_apg,
                               decode_batch_size=args.decode_batch_size)
        self.chosen.update(zip(indices, budget.per_image()))
        return [t.cpu() for t in budget.tokens]


def write_token_shards(job: TokenizeJob, out: Path, shard_size: int, resume: bool) -> dict:
    """Shards of ``shard_size`` images (training/shards.py: each written atomically, ``index.json`` at the end).
    ``resume`` skips finished shards; shards of another job (settings or model) are refused before any write."""
    from .token_files import INDEX, SHARD_GLOB, read_header
    from .training.shards import fingerprint, plan, run_sharded, shard_name

    if shard_size < 1:
        raise CLIError(f"--shard-size must be at least 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; sharded output goes to a folder")
    settings = dict(job.settings, shard_size=shard_size)
    fp = fingerprint(settings)
    existing = sorted(out.glob(SHARD_GLOB)) + ([out / INDEX] if (out / INDEX).is_file() else [])
    if existing and not resume:
        raise CLIError(f"{out} already holds token shards; pass --resume to finish an interrupted run with the same "
                       "settings, or choose a new folder")
    for path in existing:
        try:
            theirs = (json.loads(path.read_text()) if path.name == INDEX else
                      read_header(path).get("__metadata__") or {}).get("fingerprint")
        except ValueError as e:
            raise CLIError(f"{path}: not a shard of this tool ({e}); choose a new folder") from None
        if theirs != fp:
            raise CLIError(f"{path} was written with other settings or another model (job fingerprint {theirs} != "
                           f"{fp}); --resume only continues the same job: choose a new folder or delete the old shards")
    shards = plan(len(job.paths), shard_size)
    job.bar.update(sum(e - s for i, (s, e) in enumerate(shards) if (out / shard_name(i)).is_file()))
    result = run_sharded(None, out, len(job.paths), shard_size, fp, lambda s, e: job.tokens(s, e).encode(),
                         settings=settings, desc="tokenize", progress=False)
    return {"written": len(result["written"]), "skipped": len(result["skipped"])}


def cmd_detokenize(args):
    from tqdm import tqdm

    from .pipelines.image_grid import save_image_atomic

    tokens, pipe, ks, sizes = checked_detokenize_inputs(args)
    names = png_names(tokens, ks, Path(args.tokens))
    # everything is checked: from here on, writes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    rows = tokens.rows()
    per_call = max(1, args.decode_batch_size // len(ks))  # rows per detokenize call: bounded memory for big files
    with tqdm(total=len(rows) * len(ks), desc="detokenize", unit="img", disable=args.quiet) as bar:
        for (h, w), members in group_rows_by_size(sizes).items():
            for chunk in batches(members, per_call):
                images = decode_rows(pipe, rows, chunk, ks, h, w, args)
                for j, image in enumerate(images):
                    save_image_atomic(image, out / names[chunk[j // len(ks)]][j % len(ks)])
                bar.update(len(images))
    print(f"wrote {len(rows) * len(ks)} image(s) to {out}")


def checked_detokenize_inputs(args):
    """The token file, the model, the K list and per-row sizes, all checked against each other (nothing is
    written before this returns)."""
    from .token_files import load_tokens

    try:
        tokens = load_tokens(args.tokens)
    except FileNotFoundError:
        raise CLIError(f"{args.tokens}: no such token file or folder") from None
    if args.decode_batch_size < 1:
        raise CLIError(f"--decode-batch-size must be at least 1, got {args.decode_batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder for the PNGs")
    pipe = load_pipeline(args)
    # a distilled decoder shares its teacher's token space (frozen encoder, FSQ and VAE): it decodes its tokens too
    teacher = (pipe.decoder_sampling.get("distilled_from") or {}).get("fingerprint")
    if tokens.model_fingerprint not in (pipe.fingerprint, teacher):
        raise CLIError(f"{args.tokens}: these tokens were made by another model ('{tokens.model_name}', fingerprint "
                       f"{tokens.model_fingerprint[:12]}), not by --model {args.model} (fingerprint "
                       f"{pipe.fingerprint[:12]}); token ids only mean something to the model that made them")
    n, vocab = pipe.num_registers, pipe.flextok.vocab_size
    # (a matching fingerprint implies both; legacy CLI files do not record N and the vocabulary, so check)
    if tokens.max_tokens > n:
        raise CLIError(f"{args.tokens}: rows hold up to {tokens.max_tokens} tokens; --model {args.model} decodes "
                       f"1..{n}")
    top = int(max(r.max() for r in tokens.rows()))
    if top >= vocab:
        raise CLIError(f"{args.tokens}: token id {top} is outside [0, {vocab}) of --model {args.model}")
    ks = sorted(set(args.num_tokens)) if args.num_tokens else [None]  # None: each row's own tokens
    for k in ks:
        if k is not None and not 1 <= k <= n:
            raise CLIError(f"--num-tokens {k}: this model decodes 1..{n} tokens")
        if k is not None and k > tokens.min_tokens:
            i = int(tokens.lengths.argmin())
            raise CLIError(f"--num-tokens {k}: row {i} ({tokens.sources[i] or 'no source'}) of {args.tokens} has only "
                           f"{tokens.min_tokens} tokens; use K <= {tokens.min_tokens}")
    sizes = [s or tuple(pipe.default_image_size) for s in tokens.image_sizes]
    for h, w in set(sizes):
        try:
            pipe._check_image_size(h, w)
        except ValueError as e:
            raise CLIError(f"{args.tokens}: {e}") from None
    return tokens, pipe, ks, sizes


def png_names(tokens, ks, tokens_path: Path) -> list[list[str]]:
    """Per row and K: ``<source stem>[_k<K>].png``. Rows without a source are named after the token file and the
    row; clashing names get ``_1``, ``_2``, ... in row order (the same names on every run)."""
    import re

    from .images import IMAGE_SUFFIXES

    stems = []
    for i, source in enumerate(tokens.sources):
        stem = Path(source).stem if Path(source).suffix.lower() in IMAGE_SUFFIXES else source
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:100]
        stems.append(stem or f"{tokens_path.stem}_{i:05d}")
    # compared case-folded: "Cat" and "cat" are one file on case-insensitive file systems
    taken, used, names = {s.casefold() for s in stems}, set(), []
    for stem in stems:
        name, j = stem, 0
        while name.casefold() in used or (j and name.casefold() in taken):  # a suffix must not take another's name
            j += 1
            name = f"{stem}_{j}"
        used.add(name.casefold())
        names.append(name)
    suffix = (lambda k: f"_k{k}") if len(ks) > 1 else (lambda k: "")
    return [[f"{name}{suffix(k)}.png" for k in ks] for name in names]


def group_rows_by_size(sizes) -> dict:
    groups: dict = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    return groups


def decode_rows(pipe, rows, chunk, ks, h, w, args):
    """Rows ``chunk`` at every K, as PIL images (row-major). Row i's noise is seeded ``--seed + i`` whatever the
    batch, so an image does not depend on how the file is split, and every K of a row starts from the same noise."""
    import torch

    seqs = [rows[i] if k is None else rows[i][:k] for i in chunk for k in ks]
    gens = [torch.Generator().manual_seed(args.seed + i) for i in chunk for _ in ks]
    return pipe.detokenize(seqs, generator=gens, height=h, width=w, num_inference_steps=args.steps,
                           guidance_scale=args.guidance, use_apg=not args.no_apg,
                           decode_batch_size=args.decode_batch_size).images


def cmd_reconstruct(args):
    import torch

    from .pipelines.image_grid import labelled_grid, save_image_atomic

    pipe = load_pipeline(args)
    n = pipe.num_registers
    ks = sorted(set(args.tokens or [1, 4, 16, 64, n]))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise CLIError(f"--tokens {bad}: this model decodes 1..{n} tokens")
    paths = find_images(args.inputs)
    groups = grouped_by_size(paths, pipe, args)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for (w, h), items in groups.items():
        for batch in batches(items, args.batch_size):
            out = pipe(image=to_tensor([im for _, im in batch]), num_tokens=ks, generator=generator,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, use_apg=not args.no_apg,
                       decode_batch_size=args.decode_batch_size, output_type="pil")
            for i, (_, im) in enumerate(batch):
                rows.append([im] + out.images[i * len(ks) : (i + 1) * len(ks)])
    width = max(r[0].size[0] for r in rows)
    height = max(r[0].size[1] for r in rows)
    rows = [[im if im.size == (width, height) else im.resize((width, height)) for im in row] for row in rows]
    grid = labelled_grid(rows, ["input"] + [f"{k} token" + ("s" if k > 1 else "") for k in ks])
    save_image_atomic(grid, args.out)
    print(f"wrote {args.out} ({len(rows)} image(s) x {len(ks)} token budgets)")


def cmd_generate(args):
    import torch

    from .pipelines.image_grid import labelled_grid, save_image_atomic
    from .token_files import TokenFile

    pipe = load_pipeline(args)
    if pipe.ar_model is None:
        raise CLIError(f"{args.model} has no AR model: it can reconstruct images, not generate them")
    if bool(args.classes) == bool(args.prompts):
        raise CLIError("pass --class (ids or names) or --prompt, not both and not neither")
    conditions = args.classes or args.prompts
    if args.classes:
        conditions = [int(c) if c.lstrip("-").isdigit() else c for c in args.classes]
    ks = sorted(set(args.num_tokens))
    rows, labels = [], []
    generator = torch.Generator().manual_seed(args.seed)
    try:
        ids = pipe.generate_tokens(class_labels=conditions if args.classes else None,
                                   prompt=conditions if args.prompts else None, num_tokens=max(ks),
                                   ar_guidance_scale=args.ar_guidance, ar_guidance_schedule=args.ar_guidance_schedule,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   num_images_per_prompt=args.images_per_condition, generator=generator)
    except ValueError as e:
        raise CLIError(str(e)) from e
    # every prefix of each sample, decoded in one batch with one shared noise per sample
    size = args.size or pipe.default_image_size[0]
    noise = pipe.prepare_latents(ids.shape[0], size, size, torch.float32, pipe._execution_device, generator)
    sequences = [ids[i, :k] for i in range(ids.shape[0]) for k in ks]
    images = pipe.detokenize(sequences, latents=noise.repeat_interleave(len(ks), dim=0), height=size, width=size,
                             num_inference_steps=args.steps, guidance_scale=args.guidance, use_apg=not args.no_apg,
                             decode_batch_size=args.decode_batch_size).images
    per = args.images_per_condition
    for c, cond in enumerate(conditions):
        for k_index, k in enumerate(ks):
            rows.append([images[(c * per + j) * len(ks) + k_index] for j in range(per)])
            labels.append(f"{cond} @{k}")
    grid = labelled_grid(rows, [f"sample {j + 1}" for j in range(per)], row_labels=labels)
    save_image_atomic(grid, args.out)
    if args.save_tokens:  # rows are condition-major, like the grid; a row's source is its condition
        TokenFile(ids, pipe.fingerprint, str(args.model), sources=[str(c) for c in conditions for _ in range(per)],
                  image_sizes=[(size, size)] * ids.shape[0], num_registers=pipe.num_registers,
                  vocab_size=pipe.flextok.vocab_size,
                  extra={"sources_are": "conditions", "generate": {
                      "ar_guidance": args.ar_guidance, "temperature": args.temperature, "top_k": args.top_k,
                      "top_p": args.top_p, "seed": args.seed}}).save(args.save_tokens)
    print(f"wrote {args.out} ({len(conditions)} condition(s) x {per} sample(s) at {ks} tokens)")


def cmd_eval(args):
    from . import evaluation as ev
    from .metrics import build_feature_net

    if not args.inputs and not args.reference:
        raise CLIError("pass images to reconstruct (files/folders) and/or --reference FOLDER for AR generation metrics")
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    size = fit_target(pipe, args.fit, args.size)
    try:
        features = build_feature_net(args.features)
    except (ImportError, ValueError) as e:
        raise CLIError(str(e)) from e
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    results = []
    try:
        if args.inputs:
            inputs = image_layer.load_batch(args.inputs, size, args.fit, args.num_images)
            results.append(ev.evaluate_reconstruction(
                pipe, inputs, args.tokens, args.steps, args.guidance, not args.no_apg, args.perceptual, features,
                args.batch_size, args.seed, args.kid_subset_size, say))
        if args.reference:
            if features is None:
                raise CLIError("generation metrics need a feature network: --features effnet-lite0 or a path")
            reference = image_layer.load_batch([args.reference], size, args.fit, args.num_reference)
            classes = [int(c) if c.lstrip("-").isdigit() else c for c in args.classes] if args.classes else None
            results.append(ev.evaluate_generation(
                pipe, reference, features, args.tokens, args.num_samples, classes, args.prompts, args.ar_guidance,
                args.temperature, args.top_k, args.top_p, args.steps, args.gen_guidance, not args.no_apg,
                args.batch_size, args.seed, args.kid_subset_size, say))
    except ValueError as e:
        raise CLIError(str(e)) from e
    for res in results:
        what = (f"reconstruction of {res['num_images']} images" if res["task"] == "reconstruction" else
                f"generation: {res['num_samples']} AR samples vs {res['num_reference']} reference images")
        print(f"## {what} ({res['image_size'][0]}x{res['image_size'][1]}, {res['num_inference_steps']} steps, "
              f"model {args.model})\n")
        print(ev.format_table(res) + "\n")
    if args.json:
        ev.write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        ev.plot_metrics(results, args.plot, title=f"flextok eval: {args.model}")
        print(f"wrote {args.plot}")


def describe(pipe, source: str) -> dict:
    cfg = pipe.flextok.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "source": source,
        "fingerprint": pipe.fingerprint,
        "tokens": f"1..{cfg.num_registers}, vocabulary {pipe.flextok.vocab_size} (FSQ levels {list(cfg.fsq_levels)})",
        "image size": "{}x{} (multiples of {})".format(*pipe.default_image_size,
                                                       pipe.vae_scale_factor * cfg.patch_size),
        "encoder": f"dim {cfg.encoder_dim}, depth {cfg.encoder_depth}, head_dim {cfg.encoder_head_dim}, "
                   f"{count(pipe.flextok.encoder) / 1e6:.1f}M params",
        "decoder": f"dim {cfg.decoder_dim}, depth {cfg.decoder_depth}, head_dim {cfg.decoder_head_dim}, "
                   f"{count(pipe.flextok.decoder) / 1e6:.1f}M params, null condition {cfg.null_condition}, "
                   f"max_timestep {cfg.max_timestep}",
        "vae": f"{pipe.vae.config.latent_channels} channels, /{pipe.vae_scale_factor}, scaling factor "
               f"{pipe.vae.config.scaling_factor}, {count(pipe.vae) / 1e6:.1f}M params, "
               f"tokenize {'samples the posterior' if cfg.sample_posterior else 'uses the posterior mean'}",
        "ar model": "none" if pipe.ar_model is None else f"{type(pipe.ar_model).__name__}, "
                                                         f"{count(pipe.ar_model) / 1e6:.1f}M params",
    }


def cmd_info(args):
    args.device, args.dtype = "cpu", "float32"
    pipe = load_pipeline(args)
    info = describe(pipe, str(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:12s} {value}")


# -- parser -----------------------------------------------------------------------------------------
def model_options(p, positional=False):
    if positional:
        p.add_argument("model", help="our diffusers folder, an official FlexTok folder, or a hub id")
    else:
        p.add_argument("--model", default=os.environ.get("FLEXTOK_MODEL"),
                       help="our diffusers folder, an official FlexTok folder, or a hub id ($FLEXTOK_MODEL)")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:1, mps, ...")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="of the models; auto (default): float32 on the CPU (bfloat16 is 4-6x faster on CPUs with "
                        "AMX), bfloat16 on GPUs that support it, else float16; a float16 VAE runs in float32")


def image_options(p):
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--fit", choices=FITS, default="none",
                   help="for sizes the model cannot take: centre-crop or resize to --size (default: refuse)")
    p.add_argument("--size", type=int, help="target size for --fit (default: the model's largest)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


def decoder_options(p):
    """How tokens become images: the rectified-flow sampler's settings, shared by every decoding command."""
    p.add_argument("--steps", type=int, default=None,
                   help="Euler steps of the rectified-flow decoder (default: the model's: 25, or a distilled "
                        "decoder's few steps)")
    p.add_argument("--guidance", type=float, default=None,
                   help="decoder guidance scale, 1 = off, half the compute (default: the model's: 7.5, or 1 for a "
                        "distilled decoder)")
    p.add_argument("--no-apg", action="store_true", help="plain classifier-free guidance instead of APG")
    p.add_argument("--decode-batch-size", type=int, default=16, help="images decoded at once (bounds memory)")


def add_convert_parser(sub):
    p = sub.add_parser("convert", help="official release -> our diffusers-format folder")
    p.add_argument("source", help="official FlexTok folder or hub id (e.g. EPFL-VILAB/flextok_d18_d18_in1k)")
    p.add_argument("out", help="output folder")
    p.add_argument("--vae", help="AutoencoderKL folder or hub id overriding the config's vae.hf_hub_path")
    p.add_argument("--sample-posterior", dest="sample_posterior", action="store_true", default=None)
    p.add_argument("--no-sample-posterior", dest="sample_posterior", action="store_false")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)


def add_tokenize_parser(sub):
    p = sub.add_parser("tokenize", help="images -> token ids in a token file (or a folder of token shards)")
    image_options(p)
    model_options(p)
    p.add_argument("--out", required=True,
                   help="a .safetensors token file, or a folder (any other name): shard-NNNNNN.safetensors files "
                        "+ index.json")
    p.add_argument("--shard-size", type=int,
                   help=f"images per shard of a folder --out (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sharded run: finished shards are kept (same settings and model only)")
    p.add_argument("--num-tokens", type=int, help="keep the first k tokens (default: all)")
    p.add_argument("--deterministic", action="store_true",
                   help="encode the VAE posterior mean instead of a sample (the release samples)")
    p.add_argument("--auto", metavar="METRIC:TARGET",
                   help="per image, the fewest tokens whose reconstruction reaches the target: psnr:28 (dB), ssim:0.8 "
                        "or lpips:0.2 (ST-LPIPS, lower is better); ragged rows, each row's k and score in the "
                        "metadata. Decodes with --steps/--guidance/--no-apg, row i's noise seeded --seed + i")
    p.add_argument("--candidates", type=int, nargs="+", metavar="K",
                   help="--auto: the token counts to choose from (default: 1 2 4 ... N)")
    p.add_argument("--search", choices=["ascending", "bisect"],
                   help="--auto: try candidates from the smallest (default; exact) or bisect (fewer decodes; the same "
                        "choice when quality does not drop with more tokens)")
    decoder_options(p)
    p.set_defaults(func=cmd_tokenize)


def add_detokenize_parser(sub):
    p = sub.add_parser("detokenize", help="a token file (or shard folder) -> one PNG per row")
    p.add_argument("tokens", help="a token file (.safetensors, any version) or a folder of token shards")
    model_options(p)
    p.add_argument("--num-tokens", type=int, nargs="+",
                   help="decode the first K tokens of every row; several K give one PNG each (suffix _k<K>); "
                        "default: each row's own tokens")
    decoder_options(p)
    p.add_argument("--seed", type=int, default=0, help="row i's noise is seeded seed + i (the same at every K)")
    p.add_argument("--out", required=True, help="output folder: <source stem>[_k<K>].png per row")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_detokenize)


def add_reconstruct_parser(sub):
    p = sub.add_parser("reconstruct", help="images -> labelled coarse-to-fine grid at several token budgets")
    image_options(p)
    model_options(p)
    p.add_argument("--tokens", type=int, nargs="+", help="token budgets (default: 1 4 16 64 N)")
    p.add_argument("--out", default="reconstruction.png")
    decoder_options(p)
    p.set_defaults(func=cmd_reconstruct)


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="sample images from classes or prompts with the AR model")
    model_options(p)
    p.add_argument("--class", dest="classes", action="append", help="class id or name (repeatable)")
    p.add_argument("--prompt", dest="prompts", action="append", help="text prompt (repeatable)")
    p.add_argument("--num-tokens", type=int, nargs="+", default=[32],
                   help="token budget(s); several give one row per budget from the same samples")
    p.add_argument("--images-per-condition", type=int, default=4)
    p.add_argument("--ar-guidance", type=float, default=4.0)
    p.add_argument("--ar-guidance-schedule", choices=["constant", "linear"], default="constant")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    decoder_options(p)
    p.add_argument("--size", type=int, help="image size (default: the model's largest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--save-tokens", help="also write the sampled ids to this .safetensors file")
    p.set_defaults(func=cmd_generate)


def add_eval_parser(sub):
    p = sub.add_parser("eval", help="metrics vs number of tokens: reconstruction (PSNR/SSIM/perceptual/FID/KID) and "
                                    "AR generation (FID/KID vs a reference folder)")
    p.add_argument("inputs", nargs="*", help="images to reconstruct: files and/or folders (searched recursively)")
    model_options(p)
    p.add_argument("--tokens", type=int, nargs="+", help="token budgets (default: 1 2 4 ... N)")
    p.add_argument("--num-images", type=int, help="use the first N images (sorted by path)")
    p.add_argument("--fit", choices=["center-crop", "resize"], default="center-crop")
    p.add_argument("--size", type=int, help="evaluation size (default: the model's largest)")
    p.add_argument("--steps", type=int, default=None, help="decoder Euler steps (default: the model's)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                   help="decoder guidance scale(s) for reconstruction (one row group each; default 1)")
    p.add_argument("--no-apg", action="store_true")
    p.add_argument("--perceptual", default="auto",
                   help="auto (ST-LPIPS alex if stlpips-pytorch is installed) | none | stlpips-alex | stlpips-vgg | "
                        "package.module:factory")
    p.add_argument("--features", default="effnet-lite0",
                   help="FID/KID feature network: effnet-lite0 (offline; NOT comparable to published FID) | a "
                        "TorchScript file such as inception-2015-12-05.pt | package.module:factory | none")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--reference", help="folder of reference images: AR generation metrics (FID/KID per token budget)")
    p.add_argument("--num-reference", type=int, help="use the first N reference images")
    p.add_argument("--num-samples", type=int, default=100, help="AR samples per token budget")
    p.add_argument("--class", dest="classes", action="append", help="class id or name (default: all classes)")
    p.add_argument("--prompt", dest="prompts", action="append", help="text prompt (text-conditional AR models)")
    p.add_argument("--ar-guidance", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--gen-guidance", type=float, default=None,
                   help="decoder guidance for generated samples (default: the model's: 7.5, or 1 when distilled)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG plot of metric vs tokens here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def add_info_parser(sub):
    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model", help="our diffusers folder, an official FlexTok folder, or a hub id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flextok", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_convert_parser, add_tokenize_parser, add_detokenize_parser, add_reconstruct_parser,
                add_generate_parser, add_eval_parser, add_info_parser):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError, OSError) as e:
        # the library validates at its boundary and says what is wrong; a user needs that line, not a traceback
        # (FLEXTOK_DEBUG=1 shows it for bug reports)
        if os.environ.get("FLEXTOK_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in message:
            message = f"{message}: {e.filename}"
        print(f"flextok {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flextok {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
