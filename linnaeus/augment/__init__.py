"""Training-batch augmentation: device-side image augmentation, selective mixup/cutmix, metadata masking."""

from linnaeus.augment.pipeline import TrainBatchTransform, build_train_batch_transform, describe

__all__ = ["TrainBatchTransform", "build_train_batch_transform", "describe"]
