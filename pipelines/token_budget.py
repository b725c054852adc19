"""Automatic token budget: per image, the fewest tokens whose reconstruction reaches a quality target.

FlexTok orders tokens coarse to fine, so an image needs only as many as its content needs. For every image,
:func:`choose_tokens` returns the smallest candidate k whose reconstruction from the first k tokens reaches
``target`` on ``metric`` against the input image, and the largest candidate when none does.

* **metrics**: ``"psnr"`` (dB) and ``"ssim"`` (higher is better), ``"lpips"`` (ST-LPIPS alex from the
  ``stlpips-pytorch`` wheel; lower is better), or a callable ``(reconstructions, references) -> scores`` (``[B]``,
  images ``[B,3,H,W]`` in [-1,1]) with ``higher_is_better=``. Scores are taken on the decoder's float output,
  before any rounding to 8 bits. The metric functions are those of ``metrics.py``.
* **noise**: every candidate of an image starts from the same initial noise (``latents`` ``[B,C,h,w]`` when
  given, else drawn once per image from ``generator``), so a choice is reproducible: decoding
  ``tokens[i][:k_i]`` again with ``latents[i]`` gives the image that was scored.
* **cost**: the tokenizer runs once (up to the largest candidate); the decoder runs once per *evaluated*
  (image, candidate) pair, each a full ``num_inference_steps`` sampling run, with all images of a search round in
  one batched ``detokenize`` call (chunks of ``decode_batch_size``). ``search="ascending"`` tries the candidates
  from the smallest and stops at the first that reaches the target: exactly the rule above, ``index + 1`` decoder
  passes for an image whose choice is the candidate at ``index`` (at most ``len(candidates)``).
  ``search="bisect"`` halves the candidate range instead (about ``log2(len(candidates)) + 1`` passes); it gives the
  same answer whenever an image's score does not get worse with more tokens, which a trained FlexTok decoder
  usually but not always satisfies (README: measured on the demo sets). :attr:`TokenBudget.decoder_passes`
  reports the passes per image.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..flextok_core.nested_dropout import pow2_token_counts
from ..flextok_core.checks import check_float, check_int
from ..metrics import build_perceptual, psnr, ssim

AUTO = "auto"
SEARCHES = ("ascending", "bisect")
TOKENIZE_KEYWORDS = ("sample_posterior",)  # ``generator`` serves both: the posterior sample, then the noise
# detokenize arguments the search sets itself
_OWN = ("tokens", "output_type", "return_dict", "num_images_per_prompt", "height", "width")


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool
    minimum: float | None = None      # the accepted targets (check_float's range)
    maximum: float | None = None
    open_minimum: bool = False
    unit: str = ""

    def reaches(self, score: float, target: float) -> bool:
        if math.isnan(score):
            return False
        return score >= target if self.higher_is_better else score <= target

    def describe(self, target: float) -> str:
        """'psnr >= 28 dB', 'lpips <= 0.2'."""
        return f"{self.name} {'>=' if self.higher_is_better else '<='} {target:g}{self.unit}"


@functools.lru_cache(maxsize=2)
def _stlpips():
    try:
        return build_perceptual("stlpips-alex")
    except ImportError as e:
        raise ImportError("metric='lpips' needs ST-LPIPS: `pip install --no-deps stlpips-pytorch` (or pass "
                          "metric='psnr' / 'ssim', or a callable)") from e


def _lpips(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    net = _stlpips().to(x.device)
    return net(x.float(), y.float()).flatten()


METRICS = {
    "psnr": Metric("psnr", psnr, True, 0.0, None, open_minimum=True, unit=" dB"),
    "ssim": Metric("ssim", ssim, True, -1.0, 1.0),
    "lpips": Metric("lpips", _lpips, False, 0.0, None),
}


def resolve_metric(metric, higher_is_better: bool | None = None) -> Metric:
    """A metric name or a callable -> :class:`Metric`. ValueError naming ``metric`` / ``higher_is_better``."""
    if callable(metric):
        if not isinstance(higher_is_better, bool):
            raise ValueError("higher_is_better must be True or False for a callable metric (is a larger score a "
                             f"better reconstruction?), got {higher_is_better!r}")
        name = getattr(metric, "__name__", type(metric).__name__)
        return Metric(name, metric, higher_is_better)
    if not isinstance(metric, str) or metric.lower() not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)} or a callable (reconstructions, references) -> "
                         f"scores, got {metric!r}")
    resolved = METRICS[metric.lower()]
    if higher_is_better is not None and higher_is_better != resolved.higher_is_better:
        raise ValueError(f"higher_is_better={higher_is_better!r} contradicts metric={resolved.name!r}, for which "
                         f"{'higher' if resolved.higher_is_better else 'lower'} is better; leave it out")
    if resolved.name == "lpips":
        _stlpips()  # a missing wheel is reported before any work
    return resolved


_TARGET_HINTS = {"psnr": "a PSNR in dB, higher is better", "ssim": "an SSIM, higher is better",
                 "lpips": "an ST-LPIPS distance, lower is better"}


def check_target(metric: Metric, target) -> float:
    """``target`` as a finite float in the metric's range. ValueError naming ``target``."""
    return check_float("target", target, metric.minimum, metric.maximum, open_minimum=metric.open_minimum,
                       hint=_TARGET_HINTS.get(metric.name, ""))


def check_candidates(candidates, n: int) -> list[int]:
    """None -> the powers of two up to N (and N); else a non-empty list of ints in 1..N, sorted, repeats dropped."""
    if candidates is None:
        return pow2_token_counts(n)
    if isinstance(candidates, torch.Tensor):
        candidates = candidates.reshape(-1).tolist()
    if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
        raise ValueError(f"candidates must be a list of token counts in 1..{n}, got {candidates!r}")
    ks = [check_int(f"candidates[{i}]", k, 1, n) for i, k in enumerate(candidates)]
    if not ks:
        raise ValueError(f"candidates is empty: pass at least one token count in 1..{n} (or None for 1, 2, 4, ...)")
    return sorted(set(ks))


@dataclass
class TokenBudget:
    """What :func:`choose_tokens` found, per image (lists of length B)."""

    num_tokens: list[int]          # the chosen k
    scores: list[float]            # the metric at the chosen k
    reached: list[bool]            # whether that score reaches the target (False: none did, the largest is chosen)
    tokens: list[torch.Tensor]     # the chosen prefixes, 1-D LongTensors (what detokenize takes)
    evaluated: list[dict]          # every (k: score) decoded for the image, in search order
    metric: str
    target: float
    higher_is_better: bool
    candidates: list[int]
    search: str
    settings: dict = field(default_factory=dict)   # the decoder settings the scores were taken with

    @property
    def decoder_passes(self) -> list[int]:
        """Sampling runs of the decoder per image (one per evaluated candidate)."""
        return [len(e) for e in self.evaluated]

    def histogram(self) -> dict[int, int]:
        return {k: self.num_tokens.count(k) for k in self.candidates}

    def summary(self) -> dict:
        b = len(self.num_tokens)
        return {"images": b, "metric": self.metric, "target": self.target, "higher_is_better": self.higher_is_better,
                "candidates": self.candidates, "search": self.search,
                "mean_tokens": sum(self.num_tokens) / b, "histogram": self.histogram(),
                "reached": sum(self.reached), "mean_decoder_passes": sum(self.decoder_passes) / b}

    def per_image(self) -> list[dict]:
        return [{"k": k, "score": s, "reached": r, "decoder_passes": p}
                for k, s, r, p in zip(self.num_tokens, self.scores, self.reached, self.decoder_passes)]


def split_kwargs(pipe, kwargs: dict) -> tuple[dict, dict]:
    """``**kwargs`` of :func:`choose_tokens` -> (tokenize keywords, detokenize keywords), names and sampling
    settings checked before any work."""
    tokenize_kw = {k: kwargs.pop(k) for k in TOKENIZE_KEYWORDS if k in kwargs}
    search_takes = list(TOKENIZE_KEYWORDS) + ["generator"]
    pipe.check_decoder_options(kwargs, taken=_OWN, also=f"the search takes the tokenize keywords {search_takes}; ")
    if kwargs.get("decode_batch_size") is not None:
        kwargs["decode_batch_size"] = check_int("decode_batch_size", kwargs["decode_batch_size"], minimum=1)
    return tokenize_kw, kwargs


# ---------------------------------------------------------------------------------------------- search
class _Ascending:
    """Candidates from the smallest; the first that reaches the target (the rule itself)."""

    def __init__(self, candidates):
        self.candidates, self.index, self.answer = candidates, 0, None

    def next(self):
        return None if self.answer is not None else self.candidates[self.index]

    def report(self, k, reached):
        if reached or self.index == len(self.candidates) - 1:
            self.answer = k
        else:
            self.index += 1


class _Bisect:
    """The answer lies in candidates[lo..hi] (hi = the largest at first, the fallback); halve until one is left,
    then decode it if it was never decoded (for its score)."""

    def __init__(self, candidates):
        self.candidates, self.lo, self.hi, self.seen = candidates, 0, len(candidates) - 1, set()

    def next(self):
        if self.lo < self.hi:
            return self.candidates[(self.lo + self.hi) // 2]
        k = self.candidates[self.lo]
        return None if k in self.seen else k

    @property
    def answer(self):
        return self.candidates[self.lo]

    def report(self, k, reached):
        self.seen.add(k)
        if self.lo == self.hi:
            return
        if reached:
            self.hi = self.candidates.index(k)
        else:
            self.lo = self.candidates.index(k) + 1


def _score(pipe, ids, references, noise, pending, metric: Metric, decode_kw: dict) -> list[float]:
    """Decode ``pending`` [(image, k)] (chunks of decode_batch_size, one detokenize call each) -> scores."""
    size = decode_kw.get("decode_batch_size") or len(pending)
    h, w = references.shape[-2:]
    scores = []
    for start in range(0, len(pending), size):
        chunk = pending[start:start + size]
        rows = [i for i, _ in chunk]
        out = pipe.detokenize([ids[i, :k] for i, k in chunk], latents=noise[rows], height=h, width=w,
                              output_type="pt", **decode_kw).images
        recon = out.to(references.device).float() * 2 - 1
        scores += [float(s) for s in metric.fn(recon, references[rows].float()).reshape(-1).cpu()]
    return scores


def run_search(pipe, ids, references, noise, candidates, metric: Metric, target: float, search: str,
               decode_kw: dict) -> list[dict]:
    """Per image: {k: score} of every decoded candidate, and the answer. Each round decodes every unfinished
    image's next candidate in one batch."""
    searchers = [(_Ascending if search == "ascending" else _Bisect)(candidates) for _ in range(ids.shape[0])]
    evaluated = [{} for _ in searchers]
    while True:
        pending = [(i, s.next()) for i, s in enumerate(searchers) if s.next() is not None]
        if not pending:
            break
        for (i, k), score in zip(pending, _score(pipe, ids, references, noise, pending, metric, decode_kw)):
            evaluated[i][k] = score
            searchers[i].report(k, metric.reaches(score, target))
    return [dict(evaluated=e, answer=s.answer) for e, s in zip(evaluated, searchers)]


def choose_tokens(pipe, images, target, metric="psnr", candidates=None, *, higher_is_better: bool | None = None,
                  search: str = "ascending", ids: torch.Tensor | None = None, **kwargs) -> TokenBudget:
    """The search behind :meth:`FlexTokPipeline.choose_num_tokens` and ``tokenize(num_tokens="auto")``.

    images: [B,3,H,W] in [-1,1] or PIL images (the references the reconstructions are scored against).
    ids: token ids ``[B, >= max(candidates)]`` already made from ``images`` (skips the tokenizer); else the
        images are tokenized once (``generator``, ``sample_posterior``).
    kwargs: ``sample_posterior``, ``generator`` (the posterior sample, then one noise draw per image; a list gives
        one generator per image) and the decoder options of ``detokenize`` (``num_inference_steps``,
        ``guidance_scale``, ``use_apg``, ``latents`` ``[B,C,h,w]``, ``decode_batch_size``, ...).
    """
    n = pipe.num_registers
    resolved = resolve_metric(metric, higher_is_better)
    target = check_target(resolved, target)
    ks = check_candidates(candidates, n)
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    tokenize_kw, decode_kw = split_kwargs(pipe, dict(kwargs))
    generator, latents = decode_kw.pop("generator", None), decode_kw.pop("latents", None)
    references = pipe._images_to_tensor(images).to(pipe._execution_device)
    b, (h, w) = references.shape[0], references.shape[-2:]
    if ids is None:
        ids = pipe.tokenize(references, num_tokens=ks[-1], generator=generator, **tokenize_kw)
    elif ids.dim() != 2 or ids.shape[0] != b or ids.shape[1] < ks[-1]:
        raise ValueError(f"ids must hold at least {ks[-1]} tokens for each of the {b} images, got shape "
                         f"{tuple(ids.shape)}")
    noise = pipe.prepare_latents(b, h, w, torch.float32, pipe._execution_device, generator, latents)
    found = run_search(pipe, ids, references, noise, ks, resolved, target, search, decode_kw)
    chosen = [f["answer"] for f in found]
    scores = [f["evaluated"][k] for f, k in zip(found, chosen)]
    params = inspect.signature(pipe.detokenize).parameters
    settings = {name: decode_kw.get(name, params[name].default)
                for name in ("num_inference_steps", "guidance_scale", "use_apg") if name in params}
    settings["num_inference_steps"], settings["guidance_scale"] = pipe.resolve_decoder_sampling(
        settings.get("num_inference_steps"), settings.get("guidance_scale"))  # None: the checkpoint's defaults
    return TokenBudget(chosen, scores, [resolved.reaches(s, target) for s in scores],
                       [ids[i, :k] for i, k in enumerate(chosen)], [f["evaluated"] for f in found], resolved.name,
                       target, resolved.higher_is_better, ks, search, settings)


def auto_tokenize(pipe, images, num_tokens, generator=None, sample_posterior=None, **kwargs) -> list[torch.Tensor]:
    """``tokenize(images, num_tokens="auto", target=..., metric=..., ...)``: the chosen prefixes (ragged)."""
    if num_tokens != AUTO:
        raise ValueError(f"num_tokens must be an integer in 1..{pipe.num_registers} or {AUTO!r}, got {num_tokens!r}")
    if "target" not in kwargs:
        raise ValueError("num_tokens='auto' needs target= (and metric=, default 'psnr'): the quality each image's "
                         "reconstruction must reach")
    if sample_posterior is not None:
        kwargs["sample_posterior"] = sample_posterior
    return choose_tokens(pipe, images, generator=generator, **kwargs).tokens


def parse_auto(text: str) -> tuple[str, float]:
    """'psnr:28' -> ('psnr', 28.0), checked (ValueError naming the part that is wrong)."""
    metric, sep, target = str(text).partition(":")
    if not sep:
        raise ValueError(f"--auto {text!r}: give METRIC:TARGET, e.g. psnr:28, ssim:0.6 or lpips:0.2")
    if metric.strip().lower() not in METRICS:
        raise ValueError(f"--auto {text!r}: the metric must be one of {', '.join(METRICS)}, got {metric.strip()!r}")
    resolved = resolve_metric(metric.strip())
    try:
        value = float(target)
    except ValueError:
        raise ValueError(f"--auto {text!r}: the target {target!r} is not a number") from None
    try:
        return resolved.name, check_target(resolved, value)
    except ValueError as e:
        raise ValueError(f"--auto {text!r}: {e}") from None


__all__ = ["AUTO", "METRICS", "Metric", "TokenBudget", "auto_tokenize", "check_candidates", "check_target",
           "choose_tokens", "parse_auto", "resolve_metric", "run_search"]
