"""Datasets as `tf.data` pipelines: images, generated sequence tasks, text."""

from dni_tf.data.images import (DATA_DIR_ENV, IMAGE_DATASETS, DataError, ImageData,
                                default_data_dir, load_image_data, make_dataset, read_idx)
