"""FlexTokAR: a decoder-only transformer that generates FlexTok token sequences, coarse to fine.

LlamaGen-style: pre-norm blocks with RMSNorm, SwiGLU and 1-D rotary position embeddings over the token
order, no biases. The condition (a class, or the hidden states of a text encoder) is a prefix of the sequence;
the last prefix token predicts token 0 and token ``i`` predicts token ``i + 1`` (teacher forcing).

Sequence and positions::

    input     [c_1 .. c_P]   t_0   t_1  ..  t_{L-2}
    position   0  ..  0       1     2   ..   L-1
    predicts        t_0      t_1   t_2  ..  t_{L-1}

Every prefix token sits at rotary position 0, so image token ``i`` is the same distance from all of them and
its position does not depend on how long (or how padded) the text is. Prefix tokens attend to each other
bidirectionally (padding keys masked out); image tokens attend to the whole valid prefix and causally to
earlier image tokens.

Sampling (:meth:`FlexTokAR.generate`) runs cond + null conditioning in one doubled batch for classifier-free
guidance and keeps keys/values in a cache preallocated for the whole run; ``use_cache=False`` recomputes the
whole sequence at every step, as the training forward does, and is the reference the cache must reproduce.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .layers import SwiGLU, swiglu_hidden_dim
from .checks import check_float, check_int
from .precision import cpu_attention_fallback, quiet_fp32_cast_warning
from .guidance import GUIDANCE_SCHEDULES, cfg_logits, check_guidance_scale, guidance_scales
from .rng import host_values, multinomial, rand

# Paper AR sizes: depth d, width 64 d, head_dim 64 (d heads), SwiGLU hidden int(8 width / 3). The paper's
# counts are the transformer blocks alone, which these match; the 64000-token embedding adds 64000 * width once
# (tied head) or twice (untied). Blocks / total tied / total untied, class-conditional with 1000 classes:
#   ar-49m     49.2M /   90.8M /  131.7M      ar-393m   393.2M /  476.4M /  558.4M
#   ar-85m     85.0M /  134.9M /  184.0M      ar-679m   679.6M /  779.4M /  877.7M
#   ar-201m   201.3M /  267.9M /  333.4M      ar-1.33b 1327.2M / 1452.0M / 1574.9M
AR_PRESETS: dict[str, dict] = {
    "ar-49m": dict(depth=10, dim=640),
    "ar-85m": dict(depth=12, dim=768),
    "ar-201m": dict(depth=16, dim=1024),
    "ar-393m": dict(depth=20, dim=1280),
    "ar-679m": dict(depth=24, dim=1536),
    "ar-1.33b": dict(depth=30, dim=1920),
    # tests and smoke runs
    "tiny": dict(depth=2, dim=64, head_dim=32),
    "tiny-text": dict(depth=2, dim=64, head_dim=32, num_classes=0, text_dim=384),
}

# ----------------------------------------------------------------------------------------------------------
# rotary position embedding
# ----------------------------------------------------------------------------------------------------------
def rotary_tables(head_dim: int, max_positions: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_positions, head_dim / 2]``: pair ``j`` of a head turns by ``pos * theta^(-2j/head_dim)``."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * freqs
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs ``(x_2j, x_2j+1)`` of ``x [B,H,T,hd]`` by the angles of ``cos/sin [T, hd/2]``."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, H, T, hd/2] each
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def token_positions(num_prefix: int, start: int, length: int, device=None) -> torch.Tensor:
    """Rotary positions of sequence rows ``start .. start+length-1``: 0 for the prefix, ``i + 1`` for t_i."""
    rows = torch.arange(start, start + length, device=device)
    return (rows - num_prefix + 1).clamp(min=0)


def attention_mask(prefix_valid: torch.Tensor | None, num_prefix: int, start: int, num_queries: int,
                   num_keys: int, device=None) -> torch.Tensor | None:
    """Bool mask (True = attend) for query rows ``start..`` over key rows ``0..num_keys-1``.

    Prefix keys are visible to every query when valid (``prefix_valid [B, P]``, None = all valid); image keys
    are causal. Returns ``[B|1, 1, Tq, Tk]``, or None when nothing is masked (one query at the end, no padding)
    so SDPA can take its unmasked path.
    """
    if prefix_valid is None and num_queries == 1 and start + 1 == num_keys:
        return None
    q = torch.arange(start, start + num_queries, device=device)[:, None]
    k = torch.arange(num_keys, device=device)[None, :]
    allowed = (k < num_prefix) | (k <= q)  # [Tq, Tk]
    if prefix_valid is None:
        return allowed[None, None]
    keys_ok = F.pad(prefix_valid, (0, num_keys - num_prefix), value=True)  # [B, Tk]
    return allowed[None, None] & keys_ok[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------
# transformer
# ----------------------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of one block for a whole sampling run, preallocated as ``[B, H, max_len, hd]``.

    Writing in place (no per-step ``torch.cat``) keeps every step's cost independent of earlier allocations.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B,H,T,hd]`` at rows ``start..start+T-1``; return all rows so far ``[B,H,start+T,hd]``."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} is not divisible by head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, mask, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B,H,T,hd]
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, H, start+T, hd]
        with cpu_attention_fallback(q.dtype, q.device):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(b, t, -1))


class ARBlock(nn.Module):
    """Pre-norm block: ``x + Attn(RMSNorm x)``, then ``x + SwiGLU(RMSNorm x)``."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = CausalSelfAttention(dim, head_dim)
        self.mlp_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, swiglu_hidden_dim(dim, mlp_ratio))

    def forward(self, x, rope, mask, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------------------
# sampling helpers (guidance and its schedules: .guidance)
# ----------------------------------------------------------------------------------------------------------
def check_ar_sampling(guidance_scale, guidance_schedule, temperature, top_k, top_p,
                      guidance_name: str = "guidance_scale") -> tuple[float, str, float, int, float]:
    """The AR sampling settings, checked (shared by :meth:`FlexTokAR.generate` and the pipeline, which calls the
    guidance ``ar_guidance_scale``): guidance scale finite >= 0 (see ``check_guidance_scale``), schedule one of
    :data:`.guidance.GUIDANCE_SCHEDULES`, temperature finite > 0, ``top_k`` an int >= 0 (0 = off), ``top_p`` in
    (0, 1]."""
    scale = check_guidance_scale(guidance_name, guidance_scale)
    schedule_name = guidance_name.replace("_scale", "_schedule")
    if not isinstance(guidance_schedule, str) or guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"{schedule_name} must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
    temperature = check_float("temperature", temperature, minimum=0.0, open_minimum=True,
                              hint="use top_k=1 for greedy decoding")
    top_k = check_int("top_k", top_k, minimum=0)
    top_p = check_float("top_p", top_p, 0.0, 1.0, open_minimum=True, hint="1 = off")
    return scale, guidance_schedule, temperature, top_k, top_p


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the ``top_k`` largest and outside the smallest set reaching ``top_p`` mass to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the first never is)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator=None) -> torch.Tensor:
    """logits ``[B, V]`` -> token ids ``[B]`` on the logits' device; one ``torch.multinomial`` draw per call on the
    generator's device (a CPU generator for a GPU model is fine; a list draws row i from generator i)."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return multinomial(logits.softmax(dim=-1), generator)


# ----------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------
class FlexTokAR(ModelMixin, ConfigMixin):
    """Autoregressive prior over FlexTok token ids (``vocab_size`` 64000, up to ``max_tokens`` 256).

    Exactly one conditioning is configured:

    * class-conditional (``num_classes > 0``): the prefix is one token from a table of ``num_classes + 1``
      embeddings, the last being the learned null class used for classifier-free guidance;
    * text-conditional (``text_dim > 0``): the prefix is the encoder's hidden states ``[B, S, text_dim]``
      (RMS-normalised, since encoders' output scales differ widely, then projected to ``dim``), followed by a
      learned start token that predicts token 0 whatever the text's padding. The null prefix is one learned
      vector (the rest of its slots masked out); caption dropout swaps a sample's whole prefix for it.

    Why a prefix rather than cross-attention for text: the condition then lives in the same attention as the
    image tokens, so there is one block type, one KV cache (the prefix's keys are computed once at the first
    step and then only read), class and text conditioning share every code path, and guidance only swaps
    prefixes in a doubled batch. The price is that every block also runs its MLP over the S text tokens and
    every image token attends over S more keys; for captions of tens of tokens against 256 image tokens
    that is modest, and a cached sampler pays the prefix once. Cross-attention would be cheaper for very long
    texts; the LlamaGen text-to-image model makes the same prefix choice.

    Training: :meth:`loss` (cross-entropy, teacher forcing); in train mode the condition is replaced by the null
    one with probability ``class_dropout_prob`` / ``text_dropout_prob``. Sampling: :meth:`generate`.
    """

    config_name = "config.json"

    def to(self, *args, **kwargs):
        with quiet_fp32_cast_warning():  # diffusers' warning names no module here ([]): it is wrong
            return super().to(*args, **kwargs)

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 64000,
        max_tokens: int = 256,
        dim: int = 768,
        depth: int = 12,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        id2label: dict | None = None,
        text_dim: int = 0,
        text_dropout_prob: float = 0.1,
        tie_embeddings: bool = False,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
    ):
        super().__init__()
        if (num_classes > 0) == (text_dim > 0):
            raise ValueError(f"configure exactly one conditioning: num_classes > 0 (class) or text_dim > 0 (text); "
                             f"got num_classes={num_classes}, text_dim={text_dim}")
        self.tok_emb = nn.Embedding(vocab_size, dim)
        if num_classes > 0:
            self.class_emb = nn.Embedding(num_classes + 1, dim)  # row num_classes = null class
        else:
            self.text_norm = nn.RMSNorm(text_dim, eps=norm_eps)
            self.text_proj = nn.Linear(text_dim, dim, bias=False)
            self.null_text = nn.Parameter(torch.zeros(dim))
            self.start_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(ARBlock(dim, head_dim, mlp_ratio, norm_eps) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        # tied: logits reuse tok_emb.weight (no second parameter, so safetensors sees no shared tensors)
        self.head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rotary_tables(head_dim, max_tokens, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_tokens, hd/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FlexTokAR":
        """A fresh model of one of :data:`AR_PRESETS`, with any config field overridden."""
        if name not in AR_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(AR_PRESETS)}")
        return cls(**{**AR_PRESETS[name], **overrides})

    def reset_parameters(self):
        """GPT-2 init: N(0, init_std) everywhere, residual output projections scaled by 1/sqrt(2 depth) so the
        residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.depth))
            else:
                nn.init.normal_(p, std=std)

    # -- conditioning -------------------------------------------------------------------------------
    @property
    def is_text_conditional(self) -> bool:
        return self.config.text_dim > 0

    def class_ids(self, names) -> torch.Tensor:
        """Class names -> ids via the config's ``id2label`` (keys may be str after a JSON round trip)."""
        label2id = {label: int(i) for i, label in (self.config.id2label or {}).items()}
        unknown = [n for n in names if n not in label2id]
        if unknown:
            raise ValueError(f"unknown class names {unknown}; the config's id2label has {len(label2id)} labels")
        return torch.tensor([label2id[n] for n in names], dtype=torch.long)

    def embed_prefix(self, class_labels=None, text_states=None, text_mask=None, null_condition_mask=None):
        """Condition -> (prefix ``[B, P, D]``, valid ``[B, P]`` bool or None when every slot is valid).

        null_condition_mask ``[B]`` bool: samples whose prefix is the null one (CFG dropout / unconditional).
        """
        if not self.is_text_conditional:
            labels = class_labels
            if null_condition_mask is not None:
                labels = torch.where(null_condition_mask, self.config.num_classes, labels)
            return self.class_emb(labels)[:, None], None  # [B, 1, D]
        b, s, _ = text_states.shape
        states = self.text_proj(self.text_norm(text_states.to(self.text_proj.weight.dtype)))  # [B, S, D]
        valid = torch.ones(b, s, dtype=torch.bool, device=states.device) if text_mask is None else text_mask.bool()
        if null_condition_mask is not None:
            # null prefix: the learned vector in slot 0, every other text slot masked out
            first = torch.arange(s, device=states.device) == 0  # [S]
            null_states = torch.where(first[:, None], self.null_text.to(states.dtype), 0.0)  # [S, D]
            states = torch.where(null_condition_mask[:, None, None], null_states, states)
            valid = torch.where(null_condition_mask[:, None], first, valid)
        start = self.start_token.to(states.dtype).expand(b, 1, -1)
        prefix = torch.cat([states, start], dim=1)  # [B, S+1, D]
        return prefix, F.pad(valid, (0, 1), value=True)

    def _check_condition(self, class_labels, text_states, text_mask, batch: int | None = None):
        """Shape-level checks shared by forward and generate (no device syncs)."""
        if self.is_text_conditional:
            if class_labels is not None:
                raise ValueError("this model is text-conditional (text_dim > 0); pass text_states, not class_labels")
            if text_states is None:
                raise ValueError("this model is text-conditional: text_states [B, S, text_dim] is required")
            shape = tuple(text_states.shape)
            if len(shape) != 3 or shape[1] == 0 or shape[2] != self.config.text_dim:
                raise ValueError(f"text_states must be [B, S>0, {self.config.text_dim}], got {shape}")
            if text_mask is not None and tuple(text_mask.shape) != shape[:2]:
                raise ValueError(f"text_mask must be [B, S] = {shape[:2]}, got {tuple(text_mask.shape)}")
            n = text_states.shape[0]
        else:
            if text_states is not None or text_mask is not None:
                raise ValueError("this model is class-conditional (num_classes > 0); pass class_labels, "
                                 "not text_states")
            if class_labels is None:
                raise ValueError("this model is class-conditional: class_labels [B] is required")
            n = class_labels.shape[0] if class_labels.dim() == 1 else None
            if n != 0 and (n is None or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool):
                raise ValueError(f"class_labels must be a 1-D integer tensor, got {tuple(class_labels.shape)} "
                                 f"{class_labels.dtype}")
        if n == 0:
            what = "text_states" if self.is_text_conditional else "class_labels"
            raise ValueError(f"empty batch: {what} has batch size 0")
        if batch is not None and n != batch:
            raise ValueError(f"condition batch size {n} does not match tokens batch size {batch}")

    # -- forward and loss ---------------------------------------------------------------------------
    def _hidden(self, x, prefix_valid, num_prefix: int, caches=None, start: int = 0) -> torch.Tensor:
        """Sequence rows ``start..start+T-1`` ``[B, T, D]`` -> final-normed hidden states ``[B, T, D]``."""
        t = x.shape[1]
        pos = token_positions(num_prefix, start, t, device=x.device)
        rope = self.rope_cos[pos], self.rope_sin[pos]  # [T, hd/2] each
        mask = attention_mask(prefix_valid, num_prefix, start, t, start + t, device=x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if caches is None else caches[i], start)
        return self.norm(x)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.tok_emb.weight if self.head is None else self.head.weight)

    def forward(self, tokens: torch.Tensor, class_labels=None, text_states=None, text_mask=None,
                null_condition_mask: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Teacher forcing: tokens ``[B, L]`` -> logits ``[B, L, vocab]``, ``logits[:, i]`` predicting ``tokens[:, i]``
        from the condition and ``tokens[:, :i]``. ``generator`` (CPU or the model's device) seeds the condition
        dropout of train mode."""
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.config.max_tokens:
            raise ValueError(f"tokens must be [B, L] with 1 <= L <= {self.config.max_tokens}, "
                             f"got {tuple(tokens.shape)}")
        self._check_condition(class_labels, text_states, text_mask, batch=tokens.shape[0])
        drop_prob = self.config.text_dropout_prob if self.is_text_conditional else self.config.class_dropout_prob
        if self.training and drop_prob > 0:
            dropped = rand((tokens.shape[0],), generator, device=tokens.device) < drop_prob
            null_condition_mask = dropped if null_condition_mask is None else dropped | null_condition_mask
        prefix, valid = self.embed_prefix(class_labels, text_states, text_mask, null_condition_mask)
        p = prefix.shape[1]
        x = torch.cat([prefix, self.tok_emb(tokens[:, :-1])], dim=1)  # [B, P+L-1, D]
        h = self._hidden(x, valid, p)
        return self._logits(h[:, p - 1 :])  # rows P-1 .. P+L-2 predict t_0 .. t_{L-1}: [B, L, V]

    def loss(self, tokens: torch.Tensor, class_labels=None, text_states=None, text_mask=None,
             null_condition_mask: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Mean next-token cross-entropy over all ``B * L`` tokens."""
        logits = self(tokens, class_labels, text_states, text_mask, null_condition_mask, generator)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())

    # -- sampling -----------------------------------------------------------------------------------
    def _validate_generate(self, class_labels, text_states, text_mask, num_tokens, guidance_scale,
                           guidance_schedule, temperature, top_k, top_p):
        self._check_condition(class_labels, text_states, text_mask)
        # host checks (one read of the user's labels / mask, no device arithmetic)
        if not self.is_text_conditional:
            bad = [c for c in host_values(class_labels) if not 0 <= c < self.config.num_classes]
            if bad:
                raise ValueError(f"class ids must be in [0, {self.config.num_classes}); got {bad}")
        elif text_mask is not None and not all(any(row) for row in host_values(text_mask)):
            raise ValueError("every text_mask row needs at least one valid token (for no text use the null "
                             "condition via guidance instead)")
        check_int("num_tokens", num_tokens, 1, self.config.max_tokens)
        return check_ar_sampling(guidance_scale, guidance_schedule, temperature, top_k, top_p)

    @torch.no_grad()
    @apply_forward_hook
    def generate(
        self,
        class_labels=None,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        num_tokens: int | None = None,
        guidance_scale: float = 1.0,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        use_cache: bool = True,
    ) -> torch.LongTensor:
        """Sample token ids ``[B, num_tokens]`` (default ``max_tokens``), coarse to fine.

        class_labels ``[B]`` ints in ``[0, num_classes)`` or text_states ``[B, S, text_dim]`` (+ text_mask
        ``[B, S]``, 1 = real token), per the config. ``guidance_scale != 1`` runs the null condition alongside in
        one doubled batch: ``logits = null + s_i * (cond - null)``, ``s_i`` per :func:`.guidance.guidance_scales`. Then
        temperature, top-k, top-p, and one ``torch.multinomial(generator=generator)`` draw per token, on the
        generator's device (CPU or the model's; a list of ``B`` generators draws sample i from generator i).
        ``use_cache=False`` recomputes the whole sequence every step (reference path, same tokens). Under
        ``enable_model_cpu_offload`` the model's hook moves it to the execution device first.
        """
        device = self.device
        if class_labels is not None:  # also accept a list, an array or a single int
            class_labels = torch.as_tensor(class_labels)
            class_labels = class_labels[None] if class_labels.dim() == 0 else class_labels
        num_tokens = self.config.max_tokens if num_tokens is None else num_tokens
        guidance_scale, guidance_schedule, temperature, top_k, top_p = self._validate_generate(
            class_labels, text_states, text_mask, num_tokens, guidance_scale, guidance_schedule, temperature, top_k,
            top_p)
        num_tokens = int(num_tokens)
        scales = guidance_scales(num_tokens, guidance_scale, guidance_schedule)
        guided = any(s != 1.0 for s in scales)

        # conditional rows first, then (when guided) the same samples with the null condition
        if self.is_text_conditional:
            text_states = text_states.to(device)
            text_mask = None if text_mask is None else text_mask.to(device)
            b = text_states.shape[0]
            if guided:
                text_states = torch.cat([text_states, text_states])
                text_mask = None if text_mask is None else torch.cat([text_mask, text_mask])
        else:
            class_labels = class_labels.to(device=device, dtype=torch.long)
            b = class_labels.shape[0]
            if guided:
                class_labels = class_labels.repeat(2)
        null = None
        if guided:
            null = torch.arange(2 * b, device=device) >= b
        prefix, valid = self.embed_prefix(class_labels, text_states, text_mask, null)

        def pick(i: int, logits: torch.Tensor) -> torch.Tensor:  # [G*B, V] -> [B]
            logits = cfg_logits(logits, scales[i]) if guided else logits
            return sample_logits(logits, temperature, top_k, top_p, generator)

        run = self._sample_cached if use_cache else self._sample_uncached
        return run(prefix, valid, num_tokens, pick, groups=2 if guided else 1)

    def _sample_cached(self, prefix, valid, num_tokens: int, pick, groups: int) -> torch.Tensor:
        gb, p, _ = prefix.shape
        heads = self.config.dim // self.config.head_dim
        caches = [KVCache(gb, heads, p + num_tokens - 1, self.config.head_dim, prefix.dtype, prefix.device)
                  for _ in self.blocks]
        out = torch.empty(gb // groups, num_tokens, dtype=torch.long, device=prefix.device)
        h = self._hidden(prefix, valid, p, caches)[:, -1]  # prefill; the last prefix row predicts t_0
        for i in range(num_tokens):
            out[:, i] = pick(i, self._logits(h))
            if i + 1 < num_tokens:
                x = self.tok_emb(out[:, i].repeat(groups))[:, None]  # [G*B, 1, D], same token for cond and null
                h = self._hidden(x, valid, p, caches, start=p + i)[:, -1]
        return out

    def _sample_uncached(self, prefix, valid, num_tokens: int, pick, groups: int) -> torch.Tensor:
        out = torch.empty(prefix.shape[0] // groups, num_tokens, dtype=torch.long, device=prefix.device)
        for i in range(num_tokens):
            out[:, i] = pick(i, self._reference_step(prefix, valid, out[:, :i].repeat(groups, 1)))
        return out

    def _reference_step(self, prefix, valid, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the token after ``tokens [B, i]``, recomputing the whole sequence (no cache)."""
        x = torch.cat([prefix, self.tok_emb(tokens)], dim=1)  # [B, P+i, D]
        h = self._hidden(x, valid, prefix.shape[1])[:, -1]  # only the last row's logits are needed
        return self._logits(h)


__all__ = ["AR_PRESETS", "FlexTokAR", "KVCache", "check_ar_sampling", "filter_logits", "sample_logits"]
