"""Datasets (CamVid, Cityscapes, generic folders with a class file), samplers and training augmentations."""
from .datasets import (CLASS_FILE_NAMES, LAYOUTS, MAX_IMAGE_PIXELS, DataSpec, DatasetError, SegmentationDataset,
                       ShardSampler, TrainBatchSampler, build_dataset, collate_segmentation, detect_layout,
                       find_samples, load_class_file, read_image, read_label, resolve_class_set, split_names,
                       worker_init)
from .transforms import (Compose, PhotoMetricDistortion, RandomCrop, RandomFlip, RandomResize, Resize, base_scale,
                         resize_pair, train_transforms)

__all__ = ["CLASS_FILE_NAMES", "Compose", "DataSpec", "DatasetError", "LAYOUTS", "MAX_IMAGE_PIXELS",
           "PhotoMetricDistortion", "RandomCrop", "RandomFlip", "RandomResize", "Resize", "SegmentationDataset",
           "ShardSampler", "TrainBatchSampler", "base_scale", "build_dataset", "collate_segmentation",
           "detect_layout", "find_samples", "load_class_file", "read_image", "read_label", "resize_pair",
           "resolve_class_set", "split_names", "train_transforms", "worker_init"]
