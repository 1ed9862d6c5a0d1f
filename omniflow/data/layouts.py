"""Names of the image-folder layouts :mod:`omniflow.data.images` reads, in a module without torch: the alignment
scripts offer them as ``--dataset_type`` choices before they load anything heavy."""

DATASET_TYPES = ("default", "imagenet")  # default: any nested image folder; imagenet: one sub-folder per class
