"""The token-file format (token_files.py): round trips, ragged rows, the two legacy formats, bad files, shard folders,
and the ComfyUI token container on top of it (no ComfyUI needed)."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from flextok_kit import token_files as tf
from flextok_kit.nodes import core
from flextok_kit.token_files import TokenFile

FP = "d4fe527dc08dba245f47ae91197d1e3b"


def ragged() -> TokenFile:
    rows = [torch.tensor([5, 6, 7]), torch.tensor([63999]), torch.tensor([1, 2, 3, 4, 0])]
    return TokenFile.from_rows(rows, FP, model_name="m", sources=["a/x.png", "b/y.png", "cond"],
                               image_sizes=[(64, 64), (32, 48), None], num_registers=32, vocab_size=64000,
                               extra={"chosen_k": [3, 1, 5], "score": [28.5, 30.0, 27.1]})


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_with_ragged_rows(tmp_path):
    t = ragged()
    assert t.is_ragged and (t.min_tokens, t.max_tokens, t.batch_size) == (1, 5, 3)
    assert [r.tolist() for r in t.rows()] == [[5, 6, 7], [63999], [1, 2, 3, 4, 0]]
    path = tmp_path / "sub" / "t.safetensors"
    t.save(path)
    assert os.listdir(path.parent) == ["t.safetensors"]  # no temporary file left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # the usual permissions, not mkstemp's 0600
    back = tf.load(path)
    assert [r.tolist() for r in back.rows()] == [r.tolist() for r in t.rows()]
    assert back.sources == t.sources and back.image_sizes == [(64, 64), (32, 48), None]
    assert (back.model_fingerprint, back.model_name, back.num_registers, back.vocab_size) == (FP, "m", 32, 64000)
    assert back.extra == t.extra and back.format_version == "2"
    header = tf.read_header(path)
    assert header["ids"]["dtype"] == "I32" and header["ids"]["shape"] == [3, 5] and header["lengths"]["shape"] == [3]
    meta = header["__metadata__"]
    assert (meta["format"], meta["format_version"], meta["count"]) == ("flextok-tokens", "2", "3")
    assert tf.probe(path) == meta and tf.is_token_file(path)


def test_uniform_rows_and_defaults(tmp_path):
    t = TokenFile(torch.arange(8).view(2, 4), FP)
    assert not t.is_ragged and t.lengths.tolist() == [4, 4] and t.sources == ["", ""] and t.image_sizes == [None] * 2
    t.save(tmp_path / "u.safetensors")
    assert torch.equal(tf.load_tokens(tmp_path / "u.safetensors").ids, torch.arange(8).view(2, 4))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ legacy formats
def write_cli_v1_tokenize(path, ids, files, sizes, model="models/tiny", fingerprint=FP):
    """Exactly what `flextok tokenize` wrote before version 2 (cli.py cmd_tokenize)."""
    metadata = {"format": "flextok-tokens/1", "model": model, "fingerprint": fingerprint,
                "files": json.dumps(files), "image_sizes": json.dumps(sizes), "num_tokens": str(ids.shape[1])}
    save_file({"ids": ids.to(torch.int32)}, str(path), metadata=metadata)


def write_cli_v1_generate(path, ids, conditions, model="models/ar", fingerprint=FP):
    """Exactly what `flextok generate --save-tokens` wrote before version 2 (cli.py cmd_generate)."""
    meta = {"format": "flextok-tokens/1", "model": model, "fingerprint": fingerprint,
            "conditions": json.dumps([str(c) for c in conditions])}
    save_file({"ids": ids.to(torch.int32)}, str(path), metadata=meta)


def write_nodes_v1(path, ids, model_id=FP, model_name="flextok_tiny", size=(128, 128), extra=None):
    """Exactly what FlexTok Save Tokens wrote before version 2 (nodes/core.py FlexTokTokens.metadata/save_tokens)."""
    metadata = {"format": "flextok_tokens", "format_version": "1", "model_id": model_id, "model_name": model_name,
                "image_height": str(size[0]), "image_width": str(size[1]), "num_registers": "32",
                "vocab_size": "64000", "extra": json.dumps(extra or {}, sort_keys=True)}
    save_file({"ids": ids.to(torch.long).contiguous()}, str(path), metadata=metadata)


def test_legacy_cli_tokenize_file_loads(tmp_path):
    ids = torch.randint(0, 64000, (3, 8))
    path = tmp_path / "old.safetensors"
    write_cli_v1_tokenize(path, ids, ["p/a.png", "p/b.jpg", "p/c.png"], [[64, 64], [64, 64], [32, 48]])
    t = tf.load(path)
    assert torch.equal(t.ids, ids) and t.lengths.tolist() == [8, 8, 8] and t.format_version == "cli/1"
    assert t.sources == ["p/a.png", "p/b.jpg", "p/c.png"] and t.image_sizes == [(64, 64), (64, 64), (32, 48)]
    assert (t.model_fingerprint, t.model_name) == (FP, "models/tiny") and tf.is_token_file(path)
    t.save(tmp_path / "new.safetensors")  # re-written as the current version, same content
    assert tf.read_header(tmp_path / "new.safetensors")["__metadata__"]["format_version"] == "2"
    assert torch.equal(tf.load(tmp_path / "new.safetensors").ids, ids)


def test_legacy_cli_generate_file_loads(tmp_path):
    ids = torch.randint(0, 64000, (4, 16))
    path = tmp_path / "gen.safetensors"
    write_cli_v1_generate(path, ids, [207, 207, "tabby cat", "tabby cat"])
    t = tf.load(path)
    assert torch.equal(t.ids, ids) and t.sources == ["207", "207", "tabby cat", "tabby cat"]
    assert t.image_sizes == [None] * 4 and t.extra == {"sources_are": "conditions"}


def test_legacy_nodes_file_loads_in_both_front_ends(tmp_path):
    ids = torch.randint(0, 64000, (2, 5))
    path = tmp_path / "tokens_00001_.safetensors"
    write_nodes_v1(path, ids, extra={"note": 1})
    t = tf.load(path)
    assert torch.equal(t.ids, ids) and t.image_sizes == [(128, 128)] * 2 and t.format_version == "nodes/1"
    assert (t.model_fingerprint, t.model_name, t.num_registers, t.extra) == (FP, "flextok_tiny", 32, {"note": 1})
    tokens = core.load_tokens(str(path))
    assert torch.equal(tokens.ids, ids) and tokens.model_id == FP and tokens.image_size == (128, 128)
    assert core.list_token_files(str(tmp_path)) == ["tokens_00001_.safetensors"]


# ------------------------------------------------------------------------------------------------ bad files
def test_bad_files_are_refused_with_the_file_and_the_problem(tmp_path):
    good = tmp_path / "good.safetensors"
    ragged().save(good)

    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        tf.load(tmp_path / "missing.safetensors")

    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not tensors")
    with pytest.raises(ValueError, match="notes.safetensors is not a safetensors file"):
        tf.load(text)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(ValueError, match="cut.safetensors is truncated"):
        tf.load(cut)
    cut.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.safetensors is not a safetensors file"):
        tf.load(cut)

    foreign = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="weights.safetensors is a safetensors file but not FlexTok tokens"):
        tf.load(foreign)

    _, meta = ragged().encode()
    no_lengths = tmp_path / "no_lengths.safetensors"
    save_file({"ids": torch.zeros(3, 5, dtype=torch.int32)}, str(no_lengths), metadata=meta)
    with pytest.raises(ValueError, match="no_lengths.safetensors: .*without its 'lengths' tensor"):
        tf.load(no_lengths)

    def variant(name, tensors=None, **meta_changes):
        tensors_, meta_ = ragged().encode()
        tensors_.update(tensors or {})
        meta_.update(meta_changes)
        for key in [k for k, v in meta_.items() if v is None]:
            del meta_[key]
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors_, str(path), metadata=meta_)
        return path

    cases = [
        (variant("no_fp", model_fingerprint=None),
         "no_fp.safetensors: FlexTok token metadata lacks 'model_fingerprint'"),
        (variant("big_id", {"ids": torch.full((3, 5), 64000, dtype=torch.int32)}),
         "big_id.safetensors: token id 64000 at row 0, position 0 is outside \\[0, 64000\\)"),
        (variant("neg_id", {"ids": torch.full((3, 5), -1, dtype=torch.int32)}), "neg_id.safetensors: token id -1"),
        (variant("long", {"lengths": torch.tensor([3, 6, 5], dtype=torch.int32)}),
         "long.safetensors: 'lengths' must be in 1..5 .*row 1 has 6"),
        (variant("zero", {"lengths": torch.tensor([3, 0, 5], dtype=torch.int32)}), "zero.safetensors: 'lengths' must"),
        (variant("count", sources=json.dumps(["only one"])), "count.safetensors: 'sources' lists 1 entries for 3 rows"),
        (variant("sizes", image_sizes=json.dumps([[64, 64]] * 4)), "sizes.safetensors: 'image_sizes' lists 4 entries"),
        (variant("float", {"ids": torch.zeros(3, 5)}), "float.safetensors: 'ids' must be an integer tensor"),
        (variant("future", format_version="3"), "future.safetensors: token file format version '3'"),
        (variant("json", extra="{not json"), "json.safetensors: metadata 'extra' is not valid JSON"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            tf.load(path)
        assert tf.probe(path) is not None  # the header probe only says "ours"; load validates

    for path in (text, cut, foreign, tmp_path / "missing.safetensors"):
        assert tf.probe(path) is None and not tf.is_token_file(path)
    assert not tf.is_token_file(tmp_path)  # a folder is not a token file
    assert core.list_token_files(str(tmp_path)) == sorted(  # what Load Tokens offers: ours, also the bad ones
        p.name for p in tmp_path.glob("*.safetensors") if tf.probe(p) is not None)


# ------------------------------------------------------------------------------------------------ shard folders
def test_shard_folder_loads_in_order(tmp_path):
    parts = [TokenFile.from_rows([torch.tensor([i, i + 1])], FP, sources=[f"{i}.png"], image_sizes=[(64, 64)])
             for i in range(3)]
    for i, part in enumerate(parts):
        part.save(tmp_path / f"shard-{i:06d}.safetensors")
    back = tf.load_tokens(tmp_path)  # no index.json: the shard files in name order
    assert back.sources == ["0.png", "1.png", "2.png"] and back.ids.tolist() == [[0, 1], [1, 2], [2, 3]]
    index = {"shards": [{"file": "shard-000002.safetensors"}, {"file": "shard-000000.safetensors"}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert tf.load_tokens(tmp_path).sources == ["2.png", "0.png"]  # the index decides
    index["shards"].append({"file": "shard-000009.safetensors"})
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="index.json lists shards that are missing: \\['shard-000009"):
        tf.load_tokens(tmp_path)
    (tmp_path / "index.json").unlink()
    TokenFile(torch.tensor([[1]]), "e" * 32).save(tmp_path / "shard-000003.safetensors")
    with pytest.raises(ValueError, match="come from different models"):
        tf.load_tokens(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no token shards"):
        tf.load_tokens(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ ComfyUI container
def test_node_tokens_carry_ragged_rows(tmp_path):
    path = tmp_path / "r.safetensors"
    t = ragged()
    t.image_sizes = [(64, 64)] * 3
    t.save(path)
    tokens = core.load_tokens(str(path))
    assert tokens.is_ragged and tokens.num_tokens == 5 and tokens.min_tokens == 1 and tokens.image_size == (64, 64)
    assert [r.tolist() for r in tokens.decode_input()] == [r.tolist() for r in t.rows()]  # a list: ragged
    cut = tokens.truncate(3)  # each row keeps min(3, its own k)
    assert [r.tolist() for r in cut.decode_input()] == [[5, 6, 7], [63999], [1, 2, 3]]
    with pytest.raises(ValueError, match="k=6 is more than the 5 tokens"):
        tokens.truncate(6)
    assert torch.equal(cut.truncate(1).decode_input(), torch.tensor([[5], [63999], [1]]))  # uniform again: a tensor
    core.save_tokens(cut, str(tmp_path / "cut.safetensors"))
    again = tf.load(tmp_path / "cut.safetensors")
    assert again.lengths.tolist() == [3, 1, 3] and again.sources == t.sources and again.extra == t.extra

    ragged().save(tmp_path / "mixed.safetensors")  # rows of several image sizes: not one IMAGE batch
    with pytest.raises(ValueError, match="mixed.safetensors: the tokens describe images of several sizes"):
        core.load_tokens(str(tmp_path / "mixed.safetensors"))
