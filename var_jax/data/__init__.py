"""Input data, one concept per module:

  transforms.py   the reference resize / crop / [-1, 1] transforms (and `load_image_for_eval`, and the steps'
                  on-device uint8 -> [-1, 1] conversion)
  digits.py       the embedded default dataset (scikit-learn's 1,797 real 8×8 digits, upscaled)
  folder.py       an image folder with one sub-folder per class; unreadable files skipped and counted
  tfds_source.py  a TFDS dataset prepared on disk as ArrayRecord (how to prepare imagenet2012 is there)
  sources.py      `build_source(config) -> (source, num_classes)`
  pipeline.py     `make_dataset(...)` on grain (uint8 image batches), `TrainBatches` (started at a step),
                  `global_batch_from_host`
"""
