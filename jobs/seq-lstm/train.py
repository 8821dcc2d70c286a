"""A recurrent classifier: an LSTM reads each digit image row by row, top to bottom.

The rows are the sequence (8 rows of 8 pixels for the bundled digits, 28 of 28 for MNIST); the
last hidden state is classified. A classic test of whether a recurrent net can carry information
across a sequence.

    python seq-lstm/train.py --dataset digits       # offline, seconds on a CPU
    python seq-lstm/train.py --dataset mnist        # the real dataset, >= 0.98 on a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import trainkit as tk


class RowLSTM(nn.Module):
    def __init__(self, width: int, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1, 2) if x.dim() == 4 else x  # [B, 1, H, W] -> [B, H, W]: H steps of W features
        out, _ = self.lstm(rows)
        return self.head(out[:, -1])


def main(argv: list[str] | None = None) -> int:
    parser = tk.arguments(__doc__ or "", epochs=25, batch_size=64, lr=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args(argv)

    def body(rt: tk.Runtime) -> dict[str, Any]:
        train, test = tk.load(args, size=None)
        model = RowLSTM(width=train.x.shape[-1], hidden=args.hidden)
        return tk.fit_classifier(args, rt, model, train, test, image_model=False)

    return tk.run_job(args, body)


if __name__ == "__main__":
    sys.exit(main())
