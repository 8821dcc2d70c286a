"""The MNIST CNN: two 3x3 conv layers (ReLU, 2x2 max pooling), a 512-unit layer, 10 classes.

python mnist-cnn/train.py --dataset digits      # offline, seconds on a CPU
python mnist-cnn/train.py --dataset mnist       # the real dataset (downloaded), >= 0.99 on a GPU
torchrun --nproc-per-node 2 mnist-cnn/train.py  # data parallel (DDP), rank 0 writes outputs
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import trainkit as tk


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main(argv: list[str] | None = None) -> int:
    parser = tk.arguments(__doc__ or "", epochs=12, batch_size=64, lr=1e-3)
    parser.add_argument("--shift", type=int, default=2, help="random translation (pixels) for augmentation")
    args = parser.parse_args(argv)

    def body(rt: tk.Runtime) -> dict[str, Any]:
        train, test = tk.load(args, size=28)
        return tk.fit_classifier(args, rt, Net(), train, test, shift=args.shift)

    return tk.run_job(args, body)


if __name__ == "__main__":
    sys.exit(main())
