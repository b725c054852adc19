"""Package a trained pipeline export as an embedded demo model: our diffusers format, float16 storage.

    python scripts/package_demo_model.py SRC DEST

Float16 storage halves the files; ``from_pretrained`` loads them back as float32, so the demo model *is* the
float16-rounded weights (the model card's metrics are measured on DEST, not on SRC). An existing DEST/README.md
(the model card) is kept. DEST is replaced atomically.
"""
import sys
import tempfile
from pathlib import Path

import torch

from flextok_kit.flextok_core.fileio import replace_dir
from flextok_kit.pipelines import FlexTokPipeline


def main(src: str, dest: str) -> None:
    src_p, dest_p = Path(src), Path(dest)
    card = dest_p / "README.md"
    keep = card.read_text() if card.is_file() else None
    pipe = FlexTokPipeline.from_pretrained(src_p)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # every floating weight, FlexTokModel's kept-in-float32 layers too (.to(float16) keeps those; loading
            # in float32 upcasts them all again, and the files stay half size)
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_floating_point():
                    t.data = t.data.to(torch.float16)
    dest_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_p.parent, prefix=f".{dest_p.name}."))
    pipe.save_pretrained(tmp)
    if keep is not None:
        (tmp / "README.md").write_text(keep)
    replace_dir(tmp, dest_p)
    size = sum(p.stat().st_size for p in dest_p.rglob("*") if p.is_file())
    print(f"wrote {dest_p} ({size / 1e6:.1f} MB, float16 weights)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
