"""Test helper (not a test): ``python -m train_worker [--batch-delay S] <train args>``.

Runs :func:`training.trainer.train` on the command line's config, like ``python -m
training.train``, and prints what the distribution tests check: ``BATCH <epoch> <batch>`` at the
start of every training batch (after sleeping ``--batch-delay`` seconds, so a test can kill the
process at a known point) and ``WEIGHTS <json>`` with the final weights.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-delay", type=float, default=0.0)
    args, train_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from training import train, trainer

    config, _ = train.resolve_config(train_args)
    keras = importlib.import_module(trainer.resolve_keras_module(config))

    class Reporter(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(args.batch_delay)
            print(f"BATCH {self.epoch} {batch}", flush=True)

        def on_train_end(self, logs=None):
            weights = [w.tolist() for w in self.model.get_weights()]
            print("WEIGHTS " + json.dumps(weights), flush=True)

    trainer.train(config, extra_callbacks=[Reporter()])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
