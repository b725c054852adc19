"""ComfyUI nodes of the FlexTok toolkit.

``nodes.core`` is plain Python (no ComfyUI); ``nodes.comfy_nodes`` holds the node classes and imports ComfyUI, so it
is imported only by the package's root ``__init__`` when running inside ComfyUI.
"""
