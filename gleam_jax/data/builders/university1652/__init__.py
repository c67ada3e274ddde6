"""TFDS builder of University-1652 (drone / street view <-> satellite, distractor buildings kept)."""
