"""Data: the embedded digits set, image folders, synthetic images, batched augmentation, the input pipeline."""
from .augment import random_resized_crop_batch
from .digits import load_digits
from .folder import ImageFolder
from .eval_data import build_eval_data
from .loader import TrainData, build_train_data
from .synthetic import synthetic_images

__all__ = ["TrainData", "build_train_data", "build_eval_data", "load_digits", "synthetic_images", "ImageFolder",
           "random_resized_crop_batch"]
