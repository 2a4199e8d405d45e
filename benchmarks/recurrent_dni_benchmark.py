r"""Characters per second of truncated BPTT / DNI / DNI + Aux training on PTB.

    python benchmarks/recurrent_dni_benchmark.py --data_dir=/path/with/ptb

Trains each method's `TruncatedBPTT` (stateful, `--windows_per_batch` windows of
`--truncation` characters per batch, window loop and the optimizer step after
every window inside the compiled step; `--update=per_batch` for the summed
variant) and plain Keras LSTMs (`keras.Sequential` + `fit`, no state carried)
on the same PTB characters, in one process, and prints characters/s and the
ratio to the plain Keras model fed the same windows (`keras_lstm_fit`: one
window of T characters per batch, so one optimizer step per window like the
per-window methods; `keras_lstm_fit_chunk`: the whole T x windows chunk per
batch). `--jit_compile` compiles every model with XLA (PTB windows have
static lengths). The models are
timed in turn, `--repeats` times, and each keeps its best rate, so a burst of
load on a shared machine hits one repeat, not one model. Numbers depend on the
machine; compare ratios, not absolute rates.
"""

import time

import keras
import tensorflow as tf
from absl import app, flags

from dni_tf.data import text
from dni_tf.studies.recurrent_dni import LanguageModelConfig
from dni_tf.truncated_bptt import METHODS, TruncatedBPTT

flags.DEFINE_string("data_dir", None, "Directory with ptb/; default $DNI_TF_DATA_DIR.")
flags.DEFINE_integer("hidden_size", 128, "LSTM units.")
flags.DEFINE_integer("batch_size", 32, "Streams per batch.")
flags.DEFINE_integer("truncation", 5, "Window length T.")
flags.DEFINE_integer("windows_per_batch", 4, "Windows per batch.")
flags.DEFINE_integer("steps", 100, "Timed training steps (chunks of T x windows) per model.")
flags.DEFINE_integer("warmup", 10, "Untimed steps (tracing) per model.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per model, interleaved (best is kept).")
flags.DEFINE_string("update", "per_window", "per_window or per_batch for TruncatedBPTT.")
flags.DEFINE_boolean("jit_compile", False, "Compile every model with XLA.")
flags.DEFINE_float("bootstrap_scale", LanguageModelConfig.bootstrap_scale,
                   "The modules' bootstrap scale (default: the PTB study's).")
FLAGS = flags.FLAGS


def _rate(model, dataset, steps, chars_per_step):
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * chars_per_step / (time.perf_counter() - start)


def _keras_lstm(length, vocab):
    model = keras.Sequential([
        keras.Input((length, vocab)),
        keras.layers.LSTM(FLAGS.hidden_size, return_sequences=True),
        keras.layers.Dense(vocab)])
    model.compile(optimizer="adam", jit_compile=FLAGS.jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(argv):
    del argv
    corpus = text.load_ptb_chars(FLAGS.data_dir)
    vocab = corpus.vocab_size
    t, windows = FLAGS.truncation, FLAGS.windows_per_batch
    length = t * windows
    chars = FLAGS.batch_size * length
    stream = text.stream_dataset(corpus.train, FLAGS.batch_size, length, repeat=True)
    one_hot = lambda x, y: (tf.one_hot(x, vocab), y)  # noqa: E731
    # The same characters cut into windows of T: batch i * windows + j is window j of chunk i.
    window_stream = stream.flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices(
        (tf.transpose(tf.reshape(x, [FLAGS.batch_size, windows, t]), [1, 0, 2]),
         tf.transpose(tf.reshape(y, [FLAGS.batch_size, windows, t]), [1, 0, 2]))))
    # name -> (model, dataset, fit steps per timed chunk count, characters per fit step)
    models = {
        "keras_lstm_fit": (_keras_lstm(t, vocab), window_stream.map(one_hot), windows,
                           FLAGS.batch_size * t),
        "keras_lstm_fit_chunk": (_keras_lstm(length, vocab), stream.map(one_hot), 1, chars),
    }
    for method in METHODS:
        model = TruncatedBPTT(vocab, t, method=method, hidden_size=FLAGS.hidden_size,
                              loss_type="categorical", vocab_size=vocab, stateful=True,
                              batch_size=FLAGS.batch_size, update=FLAGS.update,
                              bootstrap_scale=FLAGS.bootstrap_scale)
        model.build()
        model.compile(optimizer="adam", jit_compile=FLAGS.jit_compile)
        models[method] = (model, stream, 1, chars)
    for model, dataset, per_chunk, _ in models.values():  # tracing, untimed
        model.fit(dataset, steps_per_epoch=FLAGS.warmup * per_chunk, epochs=1, verbose=0)
    rates = {name: 0.0 for name in models}
    for _ in range(FLAGS.repeats):
        for name, (model, dataset, per_chunk, chars_per_step) in models.items():
            rates[name] = max(rates[name], _rate(model, dataset, FLAGS.steps * per_chunk,
                                                 chars_per_step))
    base = rates["keras_lstm_fit"]
    print(f"PTB characters/s, hidden={FLAGS.hidden_size} batch={FLAGS.batch_size} "
          f"T={t} windows/batch={windows} update={FLAGS.update} "
          f"jit_compile={FLAGS.jit_compile}, best of {FLAGS.repeats} x {FLAGS.steps} chunks")
    for name, rate in rates.items():
        print(f"{name:22s} {rate:10.0f} chars/s  {rate / base:5.2f}x keras_lstm_fit")


if __name__ == "__main__":
    app.run(main)
