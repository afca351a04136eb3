"""Evaluation.

metrics.py            reconstruction PSNR
digits_classifier.py  a classifier of the real digits (the demo's accuracy)
feature_metrics.py    FID, sFID, Inception Score, precision/recall as the ADM evaluator defines them
inception.py          the FID Inception-v3 (pytorch-fid's port of the 2015-12-05 TF graph) in Flax NNX, converter
digits_features.py    the digits feature network (`eval --features digits`)
sources.py            image sets (.npz arr_0 streamed, folders) read batch by batch
evaluate.py           feature sets, statistics files, and the comparison the `eval` command prints
"""
