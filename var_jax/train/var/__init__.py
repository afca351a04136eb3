"""Training the VAR transformer on a frozen tokenizer's tokens.

stage.py (the trainer's VAR stage: config -> models, optimizer, step), step.py (the pure train step with in-step
tokenisation), loss.py (per-token cross-entropy, scale weights, Lm/Lt/Accm/Acct), progressive.py (progressive
training schedule), flops.py (analytic FLOPs per example), self_correction.py (Infinity's bitwise self-correction:
flipped, re-quantized history for BSQ tokenizers).
"""
