"""YAML configs with ``key.sub=value`` command-line overrides.

A config file may name a base file with ``_base_: other.yaml`` (relative to itself); the file's keys are merged
over the base. Every script has a ``DEFAULTS`` dict that defines the schema: a key that is not in the defaults is
an error (typos are caught), except below a dict whose default is empty (``{}``), which is free-form (model kwargs).
Override values are parsed as YAML (``lr=1e-4``, ``model.grid_size=[4,4]``, ``repa.encoder=none``).
A leading ``+`` (``+model.foo=1``) adds a key that the schema does not know.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The schema every training script shares; each merges its own sections over it (:func:`merged_defaults`).
COMMON_DEFAULTS = {
    "output_dir": "runs/unnamed",
    "seed": 0,
    "mixed_precision": None,          # no | bf16 | fp16 | null (= accelerate launch config / env)
    "gradient_accumulation_steps": 1,
    "max_steps": 1000,                # optimizer steps
    "epochs": None,                   # if set, max_steps = epochs * steps per epoch (map-style data only)
    "log_every": 10,
    "eval_every": 0,                  # loss on a fixed batch every N steps (0: only at start and end)
    "eval_batch_size": 8,
    "checkpoint_every": 500,
    "keep_last": 3,
    "resume": "auto",                 # auto (latest checkpoint in output_dir/checkpoints) | none | a checkpoint path
    "tracker": "none",                # none | auto (tensorboard if installed) | tensorboard | wandb | ... | a list
    "tracker_kwargs": {},             # init_kwargs for accelerator.init_trackers (free-form)
    "project_name": "flextok",
    "progress_bar": True,
    "find_unused_parameters": False,
    "allow_tf32": True,
    "debug": {"step_sleep": 0.0, "stop_after_steps": None, "rank_checksums": False},
}


class Config(dict):
    """A dict with attribute access for nested keys (``cfg.optim.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; keys: {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _wrap(x):
    if isinstance(x, dict):
        return Config({k: _wrap(v) for k, v in x.items()})
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A path as given, or a name in ``training/configs/`` (with or without ``.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config {str(path)!r} not found (neither a file nor a name in {CONFIG_DIR})")


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    path = resolve_config_path(path).resolve()
    if path in _seen:
        raise ValueError(f"config inheritance cycle: {' -> '.join(map(str, _seen + (path,)))}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at the top level, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else list(base)
    merged: dict = {}
    for b in bases:
        bp = Path(b)
        if not bp.is_absolute() and (path.parent / bp).is_file():
            bp = path.parent / bp
        merged = merge(merged, read_yaml(bp, _seen + (path,)))
    return merge(merged, data)


def merge(base: dict, update: dict) -> dict:
    """Deep merge (``update`` wins); dicts merge key by key, everything else is replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merged_defaults(*sections: dict) -> dict:
    """:data:`COMMON_DEFAULTS` with a script's own sections merged over it: that script's ``DEFAULTS``."""
    out = dict(COMMON_DEFAULTS)
    for s in sections:
        out = merge(out, s)
    return out


def _check_schema(data: dict, schema: dict, where: str = "") -> None:
    for k, v in data.items():
        name = f"{where}{k}"
        if k not in schema:
            raise KeyError(f"unknown config key {name!r}; known keys here: {sorted(schema)}")
        d = schema[k]
        if isinstance(d, dict) and d and isinstance(v, dict):
            _check_schema(v, d, name + ".")


def apply_override(data: dict, item: str, schema: dict | None = None) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    key, value = item.split("=", 1)
    key = key.strip()
    force = key.startswith("+")
    key = key.lstrip("+").lstrip("-")
    parts = key.split(".")
    node, sch = data, schema
    for i, p in enumerate(parts[:-1]):
        if sch is not None and not force:
            if p not in sch:
                raise KeyError(f"unknown config key {'.'.join(parts[:i + 1])!r} in override {item!r}; "
                               f"known keys here: {sorted(sch)}")
            sch = sch[p] if isinstance(sch[p], dict) and sch[p] else None
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    last = parts[-1]
    if sch is not None and not force and last not in sch:
        raise KeyError(f"unknown config key {key!r} in override {item!r}; known keys here: {sorted(sch)} "
                       f"(prefix the key with + to add a new one)")
    node[last] = yaml.safe_load(value) if value.strip() != "" else None


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), defaults: dict | None = None) -> Config:
    """Defaults <- YAML file (with ``_base_`` chain) <- ``key=value`` overrides, checked against the defaults."""
    defaults = defaults or {}
    data = read_yaml(path) if path else {}
    if defaults:
        _check_schema(data, defaults)
    data = merge(defaults, data)
    for item in overrides:
        apply_override(data, item, defaults or None)
    return _wrap(data)


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` with scalar values only (lists become JSON strings): for trackers."""
    out = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[name] = v if v is not None else "null"
        else:
            out[name] = json.dumps(_plain(v))
    return out


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    from ..flextok_core.fileio import atomic_write

    text = yaml.safe_dump(_plain(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def parse_cli(argv=None, description: str = "") -> tuple[str | None, list[str]]:
    """``--config X.yaml key=value --other.key=value ...`` -> (config path, overrides)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config, overrides = None, []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            print(f"{description}\n\nusage: --config FILE.yaml [key.sub=value ...]\n"
                  "FILE may also be a name in training/configs/; values are parsed as YAML.")
            raise SystemExit(0)
        if tok in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise SystemExit("--config needs a value")
            config = argv[i + 1]
            i += 2
            continue
        if tok.startswith("--config="):
            config = tok.split("=", 1)[1]
        elif "=" in tok:
            overrides.append(tok[2:] if tok.startswith("--") else tok)
        else:
            raise SystemExit(f"argument {tok!r} is neither --config FILE nor key.sub=value")
        i += 1
    return config, overrides


def config_from_argv(argv, defaults: dict, description: str = "") -> Config:
    """A script's config from its command line (``--config FILE key=value ...``; ``argv=None``: ``sys.argv``)."""
    path, overrides = parse_cli(argv, description)
    return load_config(path, overrides, defaults)
