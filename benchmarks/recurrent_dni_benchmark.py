r"""Characters per second of truncated BPTT / DNI / DNI + Aux training on PTB.

    python benchmarks/recurrent_dni_benchmark.py --data_dir=/path/with/ptb

Trains each method's `TruncatedBPTT` (stateful, `--windows_per_batch` windows of
`--truncation` characters per batch, window loop inside the compiled step) and a
plain Keras LSTM (`keras.Sequential` + `fit`, full BPTT over the same
T x windows chunks, no state carried) on the same PTB batches, in one process,
and prints characters/s and the ratio to the plain Keras model. The models are
timed in turn, `--repeats` times, and each keeps its best rate, so a burst of
load on a shared machine hits one repeat, not one model. Numbers depend on the
machine; compare ratios, not absolute rates.
"""

import time

import keras
import tensorflow as tf
from absl import app, flags

from dni_tf.data import text
from dni_tf.truncated_bptt import METHODS, TruncatedBPTT

flags.DEFINE_string("data_dir", None, "Directory with ptb/; default $DNI_TF_DATA_DIR.")
flags.DEFINE_integer("hidden_size", 128, "LSTM units.")
flags.DEFINE_integer("batch_size", 32, "Streams per batch.")
flags.DEFINE_integer("truncation", 5, "Window length T.")
flags.DEFINE_integer("windows_per_batch", 4, "Windows per batch.")
flags.DEFINE_integer("steps", 200, "Timed training steps per model.")
flags.DEFINE_integer("warmup", 20, "Untimed steps (tracing) per model.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per model, interleaved (best is kept).")
FLAGS = flags.FLAGS


def _rate(model, dataset, chars_per_step):
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
    return FLAGS.steps * chars_per_step / (time.perf_counter() - start)


def main(argv):
    del argv
    corpus = text.load_ptb_chars(FLAGS.data_dir)
    vocab = corpus.vocab_size
    length = FLAGS.truncation * FLAGS.windows_per_batch
    stream = text.stream_dataset(corpus.train, FLAGS.batch_size, length, repeat=True)
    chars = FLAGS.batch_size * length
    models = {}
    baseline = keras.Sequential([
        keras.Input((length, vocab)),
        keras.layers.LSTM(FLAGS.hidden_size, return_sequences=True),
        keras.layers.Dense(vocab)])
    baseline.compile(optimizer="adam",
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    models["keras_lstm_fit"] = (baseline, stream.map(lambda x, y: (tf.one_hot(x, vocab), y)))
    for method in METHODS:
        model = TruncatedBPTT(vocab, FLAGS.truncation, method=method,
                              hidden_size=FLAGS.hidden_size, loss_type="categorical",
                              vocab_size=vocab, stateful=True, batch_size=FLAGS.batch_size)
        model.build()
        model.compile(optimizer="adam")
        models[method] = (model, stream)
    for model, dataset in models.values():  # tracing, untimed
        model.fit(dataset, steps_per_epoch=FLAGS.warmup, epochs=1, verbose=0)
    rates = {name: 0.0 for name in models}
    for _ in range(FLAGS.repeats):
        for name, (model, dataset) in models.items():
            rates[name] = max(rates[name], _rate(model, dataset, chars))
    base = rates["keras_lstm_fit"]
    print(f"PTB characters/s, hidden={FLAGS.hidden_size} batch={FLAGS.batch_size} "
          f"T={FLAGS.truncation} windows/batch={FLAGS.windows_per_batch}, "
          f"best of {FLAGS.repeats} x {FLAGS.steps} steps")
    for name, rate in rates.items():
        print(f"{name:16s} {rate:10.0f} chars/s  {rate / base:5.2f}x keras_lstm_fit")


if __name__ == "__main__":
    app.run(main)
