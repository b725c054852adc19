"""FlexTok toolkit: ComfyUI custom-node pack and Python library (installed as ``flextok_kit``).

Outside ComfyUI importing this package does nothing heavy, never imports ComfyUI and exports empty node
mappings. Inside ComfyUI (which imports this folder by path from ``custom_nodes/``) it exposes the V3 entry point
``comfy_entrypoint`` with the FlexTok nodes; ComfyUI loads a module with ``NODE_CLASS_MAPPINGS`` as a V1 pack and
ignores its ``comfy_entrypoint``, so the mappings are not defined there.
"""
import sys

__version__ = "0.1.0"


def _inside_comfyui() -> bool:
    return "comfy" in sys.modules and "folder_paths" in sys.modules


if _inside_comfyui():  # pragma: no cover - exercised by the ComfyUI server tests
    # No try/except: if the nodes cannot be imported, ComfyUI must log the traceback ("IMPORT FAILED").
    from .nodes.comfy_nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "__version__"]
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
