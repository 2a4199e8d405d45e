"""Datasets as `tf.data` pipelines: images, generated sequence tasks, text."""

from dni_tf.data.images import (DATA_DIR_ENV, IMAGE_DATASETS, DataError, ImageData,
                                default_data_dir, load_image_data, make_dataset, read_idx)
from dni_tf.data.sequence_tasks import (TASKS, Curriculum, copy_batch, repeat_copy_batch,
                                        task_channels, task_dataset)
from dni_tf.data.text import (CharCorpus, load_ptb_chars, ptb_char_paths, stream_arrays,
                              stream_dataset)
