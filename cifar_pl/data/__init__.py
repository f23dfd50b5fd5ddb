"""Datasets as uint8 tensors, their sources (CIFAR-10/100, Fashion-MNIST, synthetic) and the DataModule."""

from cifar_pl.data.arrays import ImageArrays, IndexedImages
from cifar_pl.data.augment import BatchTransform
from cifar_pl.data.datamodule import SOURCES, ImageDataModule

__all__ = ["SOURCES", "BatchTransform", "ImageArrays", "ImageDataModule", "IndexedImages"]
