"""Training toolkit: accelerate scripts for the three FlexTok stages.

Stage 0  ``train_vae``         AutoencoderKL (L1/L2 + perceptual + KL, optional PatchGAN)
Stage 1  ``train_tokenizer``   FlexTok encoder + FSQ + rectified-flow decoder (nested dropout, CFG dropout, REPA)
         ``tokenize_dataset``  images -> sharded token files (data-parallel, resumable)
Stage 2  ``train_ar``          autoregressive model over the token ids (class- or caption-conditional)

Run any of them as ``accelerate launch -m flextok_kit.training.<script> --config <yaml> [key.sub=value ...]``.
Importing this package is cheap: the scripts import their heavy dependencies themselves.
"""
