"""The Keras Sequential CNN on Keras 3 with the PyTorch backend (no TensorFlow needed).

Conv2D(32, 3x3) -> MaxPooling(2x2) -> Flatten -> Dense(128) -> Dense(10, softmax), trained with
adam on categorical cross-entropy; saved as model.keras.

Resume is exact at epoch granularity: the model and optimizer are checkpointed (.keras) after every
epoch, and each epoch's shuffle comes from (seed, epoch), so a resumed run trains on the same order.

    python keras-mnist/train.py --dataset digits      # offline, seconds on a CPU
    python keras-mnist/train.py --dataset mnist       # the real dataset (keras.datasets.mnist)
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import trainkit as tk


def data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images as NHWC float32 in [0, 1], labels one-hot."""
    import keras

    if args.dataset == "mnist":
        (x_tr, y_tr), (x_te, y_te) = keras.datasets.mnist.load_data()
        x_tr, x_te = x_tr / 255.0, x_te / 255.0
    else:
        train, test = tk.load(args, size=28)
        x_tr, y_tr = ((train.x[:, 0] + 1) / 2).numpy(), train.y.numpy()
        x_te, y_te = ((test.x[:, 0] + 1) / 2).numpy(), test.y.numpy()
    onehot = keras.utils.to_categorical
    return (x_tr[..., None].astype("float32"), onehot(y_tr, 10), x_te[..., None].astype("float32"), onehot(y_te, 10))


def build(lr: float, total_steps: int) -> Any:
    import keras
    from keras import layers

    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])  # fmt: skip
    # Adam with the learning rate decayed to zero over the run (cosine): the last epochs settle instead of
    # swinging a point or two of accuracy from one epoch to the next. Saved with the optimizer in .keras.
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def main(argv: list[str] | None = None) -> int:
    args = tk.arguments(__doc__ or "", epochs=15, batch_size=32, lr=1e-3).parse_args(argv)

    def body(rt: tk.Runtime) -> dict[str, Any]:
        import keras

        keras.utils.set_random_seed(args.seed)
        x_tr, y_tr, x_te, y_te = data(args)
        if args.repeat_data > 1:  # throughput figures only (see --repeat-data)
            x_tr, y_tr = np.tile(x_tr, (args.repeat_data, 1, 1, 1)), np.tile(y_tr, (args.repeat_data, 1))
        ckpt, state = rt.checkpoint_dir / "keras-last.keras", rt.checkpoint_dir / "keras-last.json"
        if ckpt.exists() and state.exists():
            model = keras.models.load_model(ckpt)
            done = json.loads(state.read_text())
            rt.log(f"resumed from {ckpt.name} (epoch {done['epoch']})")
        else:
            steps = args.epochs * -(-len(x_tr) // args.batch_size)
            model, done = build(args.lr, steps), {"epoch": 0, "history": {}}
        history: dict[str, list[float]] = done["history"]
        samples, seconds = 0, 0.0
        for epoch in range(done["epoch"], args.epochs):
            order = np.random.default_rng([args.seed, epoch]).permutation(len(x_tr))
            t = time.perf_counter()
            h = model.fit(x_tr[order], y_tr[order], batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0)
            seconds += time.perf_counter() - t
            samples += len(order)
            _, acc = model.evaluate(x_te, y_te, verbose=0)
            history.setdefault("train_loss", []).append(float(h.history["loss"][-1]))
            history.setdefault("test_accuracy", []).append(float(acc))
            rt.log(f"epoch {epoch + 1}/{args.epochs} loss {history['train_loss'][-1]:.4f} test_accuracy {acc:.4f}")
            if rt.is_main:  # model + optimizer, then the position: a crash between leaves the older pair
                model.save(ckpt.with_suffix(".tmp.keras"))
                os.replace(ckpt.with_suffix(".tmp.keras"), ckpt)
                state.write_text(json.dumps({"epoch": epoch + 1, "history": history}))
            if args.stop_after and epoch + 1 >= args.stop_after:
                raise tk.Stopped()
        if rt.is_main:
            model.save(rt.output_dir / "model.keras")
        tk.plot_history(rt, history)
        return {
            "test_accuracy": history["test_accuracy"][-1],
            "train_loss": history["train_loss"][-1],
            "epochs": args.epochs,
            "samples_per_second": round(samples / seconds, 1) if seconds else None,
            "device": "cuda" if keras.backend.backend() == "torch" and _cuda() else "cpu",
            "dataset": args.dataset,
            "backend": keras.backend.backend(),
        }

    return tk.run_job(args, body)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    sys.exit(main())
