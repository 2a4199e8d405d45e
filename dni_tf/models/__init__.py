"""Plain Keras building blocks shared by the studies."""

from dni_tf.models.classifiers import mlp, tutorial_cnn
