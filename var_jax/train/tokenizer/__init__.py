"""Training the multi-scale VQ tokenizer (the code the reference VAR never shipped): the VQGAN recipe of
reconstruction + the quantizer's VQ loss + optional LPIPS + optional PatchGAN with the adaptive weight,
per-scale code usage and optional dead-code restart.

losses.py (loss terms), discriminator.py (PatchGAN), lpips.py (frozen perceptual net), code_usage.py (dead-code
restart), state.py (train state, optimizers, layout, warm start), step.py (the pure train step), stage.py (the
trainer's tokenizer stage).
"""
