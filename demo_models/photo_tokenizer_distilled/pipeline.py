# Lets diffusers load this folder without knowing FlexTok:
#   DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
# (needs `pip install flextok-kit`).
from flextok_kit.pipelines import FlexTokPipeline  # noqa: F401
