"""TFDS builder of CVUSA (the panorama <-> satellite subset of CVM-Net and Sample4Geo)."""
