"""Input data: sources (embedded digits, image folder, TFDS), the reference transforms, the grain pipeline."""
