"""Data: sources (digits, tfds, image folder), batch sampling, and on-device augmentation."""
