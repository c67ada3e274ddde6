"""TFDS builder of VIGOR (panorama <-> satellite, same-area and cross-area splits)."""
