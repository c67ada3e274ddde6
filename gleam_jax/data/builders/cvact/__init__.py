"""TFDS builder of CVACT (ANU_data_small: the train and CVACT_val splits)."""
