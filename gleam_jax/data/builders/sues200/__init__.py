"""TFDS builder of SUES-200 (drone <-> satellite at 150, 200, 250 and 300 m)."""
