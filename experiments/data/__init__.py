"""The data: what a data set is and where it comes from (`datasets`), batches as a pure function
of (seed, update) (`pipeline`), and the host augmentations (`augment`).

  python -m experiments.data prepare|info NAME     (`datasets.main`)
"""
