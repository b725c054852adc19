"""FlexTok toolkit: ComfyUI custom-node pack and Python library (installed as ``flextok_kit``).

Importing this package outside ComfyUI does nothing heavy and never imports ComfyUI; inside ComfyUI the node
mappings are exported (the nodes arrive with the ComfyUI issue).
"""
import sys

__version__ = "0.1.0"

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _inside_comfyui() -> bool:
    return "comfy" in sys.modules and "folder_paths" in sys.modules


if _inside_comfyui():  # pragma: no cover - exercised by the ComfyUI server tests
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ImportError:
        pass

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
