"""FlexTok token files: one versioned safetensors format shared by the CLI, the ComfyUI nodes and Python users.

A token file holds

* tensors: ``ids`` int32 ``[B, k_max]`` (each row's ids right-padded with 0) and ``lengths`` int32 ``[B]`` (each
  row's own k, 1..k_max; rows may differ: ragged prefixes);
* metadata (safetensors ``__metadata__``, all strings): ``format`` = ``"flextok-tokens"``, ``format_version`` =
  ``"2"``, ``model_fingerprint`` (:attr:`FlexTokPipeline.fingerprint`, which decoders check), ``model_name``,
  ``num_registers``, ``vocab_size``, ``count`` (B), ``sources`` (JSON list, per row: an image path or a generation
  condition), ``image_sizes`` (JSON list, per row ``[h, w]`` or null = the model's default size) and ``extra``
  (a JSON object for anything a writer wants to add).

A sharded output is a folder of such files (``shard-000000.safetensors``, ...) plus ``index.json``; see
:func:`load_tokens`. Files written before version 2 still load: the CLI's ``"flextok-tokens/1"`` and the ComfyUI
nodes' ``"flextok_tokens"`` version 1.

No ComfyUI and no pipeline imports here (only torch and safetensors), so every front end can use it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "flextok-tokens"
VERSION = "2"
LEGACY_CLI_FORMAT = "flextok-tokens/1"  # flextok tokenize / generate --save-tokens before version 2
LEGACY_NODES_FORMAT = "flextok_tokens"  # FlexTok Save Tokens before version 2 (with format_version "1")
INDEX = "index.json"  # the shard list of a sharded folder (training/shards.py writes it)
SHARD_GLOB = "shard-*.safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_INT_DTYPES = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}


# ----------------------------------------------------------------------------------------------- the container
@dataclass
class TokenFile:
    """Token ids of B images (rows may have different lengths) plus where they came from.

    ids: integer tensor ``[B, k_max]``, row i valid up to ``lengths[i]``; lengths: ``[B]`` (default: all k_max).
    model_fingerprint: the producing model's :attr:`FlexTokPipeline.fingerprint`; model_name: for messages.
    sources / image_sizes: per row (default "" / None; None = the model's default size).
    """

    ids: torch.Tensor
    model_fingerprint: str
    model_name: str = ""
    lengths: torch.Tensor | None = None
    sources: list[str] | None = None
    image_sizes: list | None = None
    num_registers: int | None = None
    vocab_size: int | None = None
    extra: dict = field(default_factory=dict)
    format_version: str = VERSION  # what a loaded file was written as: "2", or "cli/1" / "nodes/1"

    def __post_init__(self):
        ids = torch.as_tensor(self.ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"'ids' must have shape [B, k] with B, k >= 1, got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"'ids' must be integers, got {ids.dtype}")
        self.ids = ids.detach().to("cpu", torch.long).contiguous()
        b, k_max = self.ids.shape
        lengths = torch.full((b,), k_max) if self.lengths is None else torch.as_tensor(self.lengths)
        if lengths.dim() != 1 or lengths.shape[0] != b:
            raise ValueError(f"'lengths' must have one entry per row ({b}), got shape {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"'lengths' must be integers, got {lengths.dtype}")
        self.lengths = lengths.to("cpu", torch.long)
        bad = (self.lengths < 1) | (self.lengths > k_max)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"'lengths' must be in 1..{k_max} (the width of 'ids'), row {i} has "
                             f"{int(self.lengths[i])}")
        self.sources = [""] * b if self.sources is None else [str(s) for s in self.sources]
        self.image_sizes = [None] * b if self.image_sizes is None else [_size(s) for s in self.image_sizes]
        for name in ("sources", "image_sizes"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"'{name}' lists {len(getattr(self, name))} entries for {b} rows")
        self.num_registers = None if self.num_registers is None else int(self.num_registers)
        self.vocab_size = None if self.vocab_size is None else int(self.vocab_size)
        self._check_ids()
        if not isinstance(self.extra, dict):
            raise ValueError(f"'extra' must be a JSON object, got {type(self.extra).__name__}")

    def _check_ids(self):
        valid = torch.arange(self.ids.shape[1])[None] < self.lengths[:, None]  # padding is not checked
        bad = self.ids < 0
        if self.vocab_size is not None:  # legacy CLI files do not record it; decoders check against their model
            bad |= self.ids >= self.vocab_size
        bad &= valid
        if bad.any():
            i, j = (int(x) for x in bad.nonzero()[0])
            top = "vocab_size" if self.vocab_size is None else self.vocab_size
            raise ValueError(f"token id {int(self.ids[i, j])} at row {i}, position {j} is outside [0, {top})")
        if self.num_registers is not None and int(self.lengths.max()) > self.num_registers:
            raise ValueError(f"rows have up to {int(self.lengths.max())} tokens, more than the model's "
                             f"num_registers={self.num_registers}")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows, model_fingerprint: str, **kwargs) -> "TokenFile":
        """``rows``: a tensor ``[B, k]`` or a list of 1-D id tensors of any lengths (ragged)."""
        if isinstance(rows, torch.Tensor):
            return cls(rows, model_fingerprint, **kwargs)
        rows = [torch.as_tensor(r).reshape(-1) for r in rows]
        if not rows:
            raise ValueError("no token rows given")
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.zeros(len(rows), max(1, int(lengths.max())), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        return cls(ids, model_fingerprint, lengths=lengths, **kwargs)

    @classmethod
    def concat(cls, parts: list["TokenFile"]) -> "TokenFile":
        """Rows of several files (shards of one job) in order; they must come from one model."""
        first = parts[0]
        for p in parts[1:]:
            if p.model_fingerprint != first.model_fingerprint:
                raise ValueError(f"the parts come from different models (fingerprints "
                                 f"{first.model_fingerprint[:12]} and {p.model_fingerprint[:12]})")
        return cls.from_rows([r for p in parts for r in p.rows()], first.model_fingerprint,
                             model_name=first.model_name, sources=[s for p in parts for s in p.sources],
                             image_sizes=[s for p in parts for s in p.image_sizes],
                             num_registers=first.num_registers, vocab_size=first.vocab_size, extra=dict(first.extra))

    # -- access ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def max_tokens(self) -> int:
        return int(self.lengths.max())

    @property
    def min_tokens(self) -> int:
        return int(self.lengths.min())

    @property
    def is_ragged(self) -> bool:
        return self.min_tokens != self.max_tokens

    def rows(self) -> list[torch.Tensor]:
        """Each row's own ids, as 1-D LongTensors."""
        return [self.ids[i, : int(n)] for i, n in enumerate(self.lengths)]

    def __repr__(self):
        k = f"k={self.max_tokens}" if not self.is_ragged else f"k={self.min_tokens}..{self.max_tokens}"
        return (f"TokenFile(rows={self.batch_size}, {k}, model='{self.model_name}' {self.model_fingerprint[:12]}, "
                f"format {self.format_version})")

    # -- writing -----------------------------------------------------------------------------------
    def encode(self) -> tuple[dict, dict]:
        """The safetensors content: (tensors, metadata). Always written as the current version."""
        tensors = {"ids": self.ids.to(torch.int32).contiguous(), "lengths": self.lengths.to(torch.int32)}
        metadata = {
            "format": FORMAT, "format_version": VERSION, "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name, "count": str(self.batch_size),
            "num_registers": "" if self.num_registers is None else str(self.num_registers),
            "vocab_size": "" if self.vocab_size is None else str(self.vocab_size),
            "sources": json.dumps(self.sources),
            "image_sizes": json.dumps([None if s is None else list(s) for s in self.image_sizes]),
            "extra": json.dumps(self.extra, sort_keys=True, default=str),
        }
        return tensors, metadata

    def save(self, path) -> None:
        """Write atomically (temporary file + rename): a reader never sees a half-written file."""
        write_safetensors(path, *self.encode())


def write_safetensors(path, tensors: dict, metadata: dict) -> None:
    """Atomic safetensors write: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    from .flextok_core.fileio import atomic_write

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _size(s):
    if s is None:
        return None
    h, w = (int(x) for x in s)
    if h < 1 or w < 1:
        raise ValueError(f"image size {h}x{w} is not a size")
    return (h, w)


# ----------------------------------------------------------------------------------------------- reading
def read_header(path) -> dict:
    """The JSON header of a safetensors file, checked against the file's length. ValueError naming the problem."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError for a missing file
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (no valid header)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header promises {8 + n + end} bytes, the file has {size}")
    return header


def probe(path) -> dict | None:
    """Header only: the metadata if ``path`` is a FlexTok token file (any version), else None. Never raises."""
    try:
        meta = read_header(path).get("__metadata__") or {}
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None
    return meta if meta.get("format") in (FORMAT, LEGACY_CLI_FORMAT, LEGACY_NODES_FORMAT) else None


def is_token_file(path) -> bool:
    return str(path).endswith(".safetensors") and probe(path) is not None


def load(path) -> TokenFile:
    """Read one token file (version 2 or a legacy one), validated. ValueError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a token file (for a sharded folder use load_tokens)")
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    fmt = meta.get("format")
    if fmt not in (FORMAT, LEGACY_CLI_FORMAT, LEGACY_NODES_FORMAT):
        raise ValueError(f"{path} is a safetensors file but not FlexTok tokens (metadata format={fmt!r}, "
                         f"expected {FORMAT!r}); write token files with `flextok tokenize` or FlexTok Save Tokens")
    for key in ("ids", "lengths") if fmt == FORMAT else ("ids",):
        if key not in header:
            raise ValueError(f"{path}: FlexTok token file without its {key!r} tensor")
        if header[key].get("dtype") not in _INT_DTYPES:
            raise ValueError(f"{path}: {key!r} must be an integer tensor, got {header[key].get('dtype')}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{path}: cannot read the tensors: {e}") from None
    reader = {FORMAT: _from_v2, LEGACY_CLI_FORMAT: _from_cli_v1, LEGACY_NODES_FORMAT: _from_nodes_v1}[fmt]
    try:
        return reader(tensors, meta)
    except KeyError as e:
        raise ValueError(f"{path}: FlexTok token metadata lacks {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def _json(meta: dict, key: str, default):
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except ValueError:
        raise ValueError(f"metadata {key!r} is not valid JSON") from None


def _int_or_none(text):
    return int(text) if text not in (None, "") else None


def _from_v2(tensors: dict, meta: dict) -> TokenFile:
    version = meta.get("format_version")
    if version != VERSION:
        raise ValueError(f"token file format version {version!r} is not one this flextok_kit reads ({VERSION!r}); "
                         "update flextok_kit")
    return TokenFile(tensors["ids"], meta["model_fingerprint"], meta.get("model_name", ""), tensors["lengths"],
                     _json(meta, "sources", None), _json(meta, "image_sizes", None),
                     _int_or_none(meta.get("num_registers")), _int_or_none(meta.get("vocab_size")),
                     _json(meta, "extra", {}), format_version=VERSION)


def _from_cli_v1(tensors: dict, meta: dict) -> TokenFile:
    """``flextok tokenize`` (files + image_sizes) or ``generate --save-tokens`` (conditions) before version 2."""
    conditions = _json(meta, "conditions", None)
    sources = _json(meta, "files", None) or conditions
    return TokenFile(tensors["ids"], meta["fingerprint"], meta.get("model", ""), sources=sources,
                     image_sizes=_json(meta, "image_sizes", None),
                     extra={"sources_are": "conditions"} if conditions else {}, format_version="cli/1")


def _from_nodes_v1(tensors: dict, meta: dict) -> TokenFile:
    """FlexTok Save Tokens before version 2: one image size for the batch, no per-row sources."""
    if meta.get("format_version") != "1":
        raise ValueError(f"format {LEGACY_NODES_FORMAT!r} version {meta.get('format_version')!r} is unknown")
    ids = tensors["ids"]
    size = (int(meta["image_height"]), int(meta["image_width"]))
    return TokenFile(ids, meta["model_id"], meta.get("model_name", ""), image_sizes=[size] * max(1, len(ids)),
                     num_registers=int(meta["num_registers"]), vocab_size=int(meta["vocab_size"]),
                     extra=_json(meta, "extra", {}), format_version="nodes/1")


def shard_files(folder) -> list[Path]:
    """The token files of a sharded folder in order: from ``index.json``, else ``shard-*.safetensors`` sorted."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            entries = json.loads(index.read_text())["shards"]
            files = [folder / e["file"] for e in entries]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{index} is not a shard index (a JSON object with a 'shards' list)") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are missing: {missing[:5]}")
    else:
        files = sorted(folder.glob(SHARD_GLOB))
    if not files:
        raise ValueError(f"{folder} holds no token shards ({INDEX} or {SHARD_GLOB})")
    return files


def load_tokens(path) -> TokenFile:
    """A token file, or a sharded folder (its shards' rows concatenated in order)."""
    path = Path(path)
    if not path.is_dir():
        return load(path)
    parts = [load(f) for f in shard_files(path)]
    try:
        return TokenFile.concat(parts)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
