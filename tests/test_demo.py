"""The quick-start job (python -m flextok_kit.demo) runs and writes its grid."""
import PIL.Image
import pytest

from flextok_kit import demo

from .conftest import GOLDEN


def test_demo_default_model(tmp_path, capsys):
    # the embedded demo tokenizer when committed (else the golden tiny checkpoint), the bundled sample photos
    path = demo.main(["--steps", "2", "--out", str(tmp_path)])
    assert path == tmp_path / "coarse_to_fine.png" and path.is_file()
    out = capsys.readouterr().out
    assert "PSNR (dB) by number of tokens" in out and "wrote" in out
    im = PIL.Image.open(path)
    n_samples = max(1, len(list(demo.SAMPLES.glob("*.jpg"))))
    assert im.size[1] > n_samples * 64
    # the generation part: one row per Fashion-MNIST class, prefixes 1..16 + 3 more samples, 64-px tiles
    gen = tmp_path / "generated_by_class.png"
    assert gen.is_file() and "AR model:" in out and "10 classes, 16 tokens" in out
    assert PIL.Image.open(gen).size[1] > 10 * 64


def test_demo_embedded_model_present():
    assert (demo.DEMO_MODEL / "model_index.json").is_file(), "demo_models/photo_tokenizer is missing"
    assert len(list(demo.SAMPLES.glob("*.jpg"))) >= 2


def test_demo_other_model_and_images(tmp_path):
    img = tmp_path / "in.png"
    PIL.Image.new("RGB", (80, 50), (200, 40, 40)).save(img)
    path = demo.main(["--model", str(GOLDEN), "--images", str(img), "--steps", "1", "--size", "32",
                      "--out", str(tmp_path / "o"), "--no-ar"])
    assert PIL.Image.open(path).size[0] > 32 * 7
    assert not (tmp_path / "o" / "generated_by_class.png").exists()


def test_demo_ar_model_must_be_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        demo.main(["--steps", "1", "--out", str(tmp_path), "--ar-model", str(tmp_path / "nothing")])


def test_comfyui_examples_use_the_demo_models_settings():
    """The ComfyUI examples (what scripts/comfyui_demo.sh opens) decode like the quick start and the model cards:
    a held-out sample photo, k = 1, 2, 4, ..., 16, 25 Euler steps, guidance 3 with APG; AR guidance 3."""
    import json

    examples = demo.HERE / "example_workflows"
    nodes = {}
    for name in ("flextok_reconstruct", "flextok_ar_generate"):
        for node in json.loads((examples / f"{name}.json").read_text())["nodes"]:
            nodes.setdefault((name, node["type"]), []).append(node.get("widgets_values"))
    (image, _), = nodes["flextok_reconstruct", "LoadImage"]
    assert (demo.SAMPLES / image).is_file(), image
    for name in ("flextok_reconstruct", "flextok_ar_generate"):
        (k_values, *c2f), = nodes[name, "FlexTokCoarseToFine"]
        assert [int(k) for k in k_values.split(",")] == demo.pow2_token_counts(16), name
        (dec,) = nodes[name, "FlexTokDecode"]
        assert c2f[:3] == dec[:3] == [25, 3.0, True], name  # steps, guidance_scale, use_apg
    (ar,) = nodes["flextok_ar_generate", "FlexTokARGenerate"]
    assert ar[3] == demo.AR_DEMO_SETTINGS["ar_guidance_scale"] and ar[5] == demo.AR_DEMO_SETTINGS["top_k"]
    assert dec[1] == demo.AR_DEMO_SETTINGS["guidance_scale"]


def test_auto_tokens_example_decodes_what_it_scored():
    """example_workflows/flextok_auto_tokens.json: the three held-out sample photos in one batch, the photo demo model,
    a PSNR target the demo model reaches for some photos and not for others (13 dB: see README, Automatic token
    budget), the model card's sampling, and a Decode with the same steps, guidance, APG and seed as the search, so it
    renders the images that were scored."""
    import json

    ui = json.loads((demo.HERE / "example_workflows" / "flextok_auto_tokens.json").read_text())
    nodes = {}
    for node in ui["nodes"]:
        nodes.setdefault(node["type"], []).append(node.get("widgets_values"))
    photos = sorted(values[0] for values in nodes["LoadImage"])
    assert photos == sorted(p.name for p in demo.SAMPLES.glob("*.jpg"))
    assert nodes["FlexTokLoad"] == [["photo_tokenizer", "default", "auto"]]
    (auto,), (dec,) = nodes["FlexTokAutoTokens"], nodes["FlexTokDecode"]
    metric, target, candidates, fit, posterior_seed, *sampling = auto
    assert (metric, target, candidates, fit) == ("psnr", 13.0, "", "center-crop")
    assert sampling[:4] == dec[:4] == [25, 3.0, True, 0]  # steps, guidance_scale, use_apg, seed
    assert sampling[4] == dec[4] == "fixed"
    assert len(nodes["ImageBatch"]) == 2 and "PreviewAny" in nodes and "FlexTokSaveTokens" in nodes

    # what the node computes (image i: posterior seed + i, noise seed + i): some photos reach the target, one not
    import torch

    from flextok_kit.images import load_batch
    from flextok_kit.pipelines import FlexTokPipeline
    from flextok_kit.pipelines.token_budget import choose_tokens

    order = [values[0] for values in nodes["LoadImage"]]  # the batch order: the Image Batch nodes keep it
    pipe = FlexTokPipeline.from_pretrained(demo.DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    x = torch.cat([load_batch([demo.SAMPLES / name], 64, fit) for name in order])
    ids = torch.cat([pipe.tokenize(x[i:i + 1], generator=torch.Generator().manual_seed(posterior_seed + i))
                     for i in range(3)])
    res = choose_tokens(pipe, x, target, metric, ids=ids, num_inference_steps=sampling[0], guidance_scale=sampling[1],
                        use_apg=sampling[2], generator=[torch.Generator().manual_seed(sampling[3] + i)
                                                        for i in range(3)])
    assert 0 < sum(res.reached) < 3 and min(res.num_tokens) < 16, res.summary()


def test_demo_distilled_runs_the_students_sampler(tmp_path, capsys):
    # `bash scripts/quickstart.sh --distilled`: both distilled demo models, at their own 4-step, unguided sampler
    path = demo.main(["--distilled", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert path.is_file() and (tmp_path / "generated_by_class.png").is_file()
    assert "photo_tokenizer_distilled" in out and "fashion_ar_distilled" in out
