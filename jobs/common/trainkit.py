"""What every example job needs besides its model: arguments, device, data, checkpoints, outputs.

Shared by the jobs in this folder (their job.yaml sets `workdir: ..` so it travels with them).

- Device: CUDA when present (bf16 autocast, channels_last, TF32), CPU otherwise. On CUDA (not
  --seed-style) a training step is small next to the CPU's cost of launching its hundred-odd kernels,
  so the step (batch gather, augmentation, forward, backward, fused Adam) is captured once as a CUDA
  graph and replayed: one launch per step, no host sync (`CudaGraphStep`; --eager turns it off).
- Distributed: under `torchrun` (WORLD_SIZE > 1) it initialises the process group (nccl on GPU,
  gloo on CPU), shards batches with DistributedSampler, and only rank 0 writes outputs.
- Data: `--dataset digits` is scikit-learn's bundled 8x8 digits (offline, resized to the model's
  input); `--dataset mnist` downloads MNIST's IDX files on the VM (a mirror list, checked by size).
  Small datasets live whole on the device; batches are index slices, no DataLoader workers.
- Checkpoints under $ORCH_CHECKPOINT_DIR every N steps, written atomically, holding the model,
  optimizer, RNG states and the position in the epoch, so a resumed run ends exactly where an
  uninterrupted one does.
- Outputs under $ORCH_OUTPUT_DIR: metrics.json, the model, plots.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_FILES = {  # name -> expected size in bytes (gzip)
    "train-images-idx3-ubyte.gz": 9912422,
    "train-labels-idx1-ubyte.gz": 28881,
    "t10k-images-idx3-ubyte.gz": 1648877,
    "t10k-labels-idx1-ubyte.gz": 4542,
}


def arguments(
    description: str, *, epochs: int, batch_size: int, lr: float, checkpoint_every: int = 50, amp: str = "bf16"
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--dataset",
        choices=["digits", "mnist"],
        default="digits",
        help="digits: bundled with scikit-learn, offline; mnist: downloaded (needs network)",
    )
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="steps between checkpoints")
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps (to test resume)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--data-dir", default=os.environ.get("ORCH_DATA_DIR", str(Path.home() / ".cache" / "orch-data")))
    p.add_argument(
        "--seed-style",
        action="store_true",
        help="plain fp32 loop with a CPU DataLoader (the throughput benchmark's baseline)",
    )
    p.add_argument(
        "--amp",
        choices=["bf16", "off"],
        default=amp,
        help="CUDA only: bf16 autocast, or off (fp32 with TF32 matmuls); the CPU and --seed-style never autocast",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="CUDA only: run each training step eagerly instead of replaying it as a CUDA graph",
    )
    p.add_argument(
        "--repeat-data",
        type=int,
        default=1,
        metavar="N",
        help="tile the training set N times per epoch (for throughput figures on the small digits set: "
        "an epoch of its 1,437 images is only a few GPU steps); accuracy is not what it measures",
    )
    return p


# ------------------------------------------------------------------------------------------ runtime


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    output_dir: Path
    checkpoint_dir: Path
    fast: bool  # the GPU recipe (bf16 autocast, channels_last, data on device)
    amp: bool = True  # bf16 autocast in the fast recipe on CUDA (--amp off: fp32/TF32)
    graphs: bool = True  # the fast recipe on CUDA replays each step as a CUDA graph (--eager: no)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cuda_fast(self) -> bool:
        """The fast recipe on a GPU: what runs when the device is CUDA and not --seed-style."""
        return self.fast and self.device.type == "cuda"

    @property
    def cuda_graphs(self) -> bool:
        """Whether training steps are captured as CUDA graphs (one process, no DDP: DDP's all-reduce
        would need its own warm-up and capture rules, so DDP steps run eagerly)."""
        return self.cuda_fast and self.graphs and not self.distributed

    def autocast(self, cache: bool = True) -> AbstractContextManager[Any]:
        """bf16 autocast in the fast recipe on CUDA. cache=False inside a CUDA graph capture (autocast's
        weight-cast cache must not outlive the capture)."""
        if self.cuda_fast and self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
        return nullcontext()

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def setup(args: argparse.Namespace) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:  # "cuda": this process's GPU (set_device needs one)
            device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not args.seed_style
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    seed_everything(args.seed)
    out = Path(os.environ.get("ORCH_OUTPUT_DIR", "outputs"))
    ckpt = Path(os.environ.get("ORCH_CHECKPOINT_DIR", "checkpoints"))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.mkdir(parents=True, exist_ok=True)
    return Runtime(
        device,
        rank,
        world,
        out,
        ckpt,
        fast=not args.seed_style,
        amp=getattr(args, "amp", "bf16") != "off",
        graphs=not getattr(args, "eager", False),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def teardown(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    x: torch.Tensor  # float32 [N, 1, H, W] in [-1, 1]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


def load(args: argparse.Namespace, size: int | None = 28) -> tuple[Split, Split]:
    """(train, test) images scaled to size x size (None: as they come), values in [-1, 1]."""
    if args.dataset == "mnist":
        x_tr, y_tr, x_te, y_te = load_mnist(Path(args.data_dir))
    else:
        x_tr, y_tr, x_te, y_te = load_digits()
    return _to_split(x_tr, y_tr, size), _to_split(x_te, y_te, size)


def tile(split: Split, times: int) -> Split:
    """The split repeated `times` times (--repeat-data), for a throughput figure over more steps."""
    if times <= 1:
        return split
    return Split(split.x.repeat(times, 1, 1, 1), split.y.repeat(times))


def _to_split(x: np.ndarray, y: np.ndarray, size: int | None) -> Split:
    t = torch.from_numpy(x.astype(np.float32))[:, None]
    if size is not None and t.shape[-1] != size:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return Split(t * 2 - 1, torch.from_numpy(y.astype(np.int64)))


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, a fixed stratified 80/20 split, values in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = d.images / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return x_tr, y_tr, x_te, y_te


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, size in MNIST_FILES.items():
        target = data_dir / name
        if target.exists() and target.stat().st_size == size:
            continue
        for mirror in MNIST_MIRRORS:
            try:
                urllib.request.urlretrieve(mirror + name, str(target) + ".part")
            except OSError:
                continue
            if os.path.getsize(str(target) + ".part") == size:
                os.replace(str(target) + ".part", target)
                break
        else:
            raise SystemExit(f"could not download {name} from any MNIST mirror; use --dataset digits offline")
    x_tr = read_idx(data_dir / "train-images-idx3-ubyte.gz") / 255.0
    y_tr = read_idx(data_dir / "train-labels-idx1-ubyte.gz")
    x_te = read_idx(data_dir / "t10k-images-idx3-ubyte.gz") / 255.0
    y_te = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz")
    return x_tr, y_tr, x_te, y_te


class _Indices(torch.utils.data.Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def epoch_batches(n: int, batch_size: int, epoch: int, rt: Runtime, seed: int) -> list[torch.Tensor]:
    """This rank's batches of indices for `epoch`: shuffled by (seed, epoch), so a resumed run sees the
    same order; sharded across ranks by DistributedSampler."""
    sampler = torch.utils.data.DistributedSampler(
        _Indices(n), num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    return list(order.split(batch_size))


def epoch_order(n: int, epoch: int, rt: Runtime, seed: int) -> torch.Tensor:
    """This rank's order of the `n` samples for `epoch`, as one tensor: exactly DistributedSampler's
    (shuffle=True, drop_last=False) list, which `epoch_batches` splits, without a Python list of ints."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / rt.world_size) * rt.world_size  # padded by repeating the start, as the sampler does
    if total > n:
        perm = perm.repeat(math.ceil(total / n))[:total]
    return perm[rt.rank : total : rt.world_size]


def device_batches(
    n: int, batch_size: int, epoch: int, rt: Runtime, seed: int, start: int = 0
) -> Iterator[torch.Tensor]:
    """`epoch_batches(...)[start:]` as slices of one index tensor moved to the device once per epoch,
    so no step copies indices from the host (the CUDA fast path)."""
    order = epoch_order(n, epoch, rt, seed).to(rt.device)
    for i in range(start * batch_size, len(order), batch_size):
        yield order[i : i + batch_size]


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (a fresh shift per image, from torch's RNG so a
    resumed run draws the same ones); the border is filled with the background value (-1)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    oy = torch.randint(0, 2 * max_shift + 1, (b,), device="cpu").to(x.device)
    ox = torch.randint(0, 2 * max_shift + 1, (b,), device="cpu").to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return torch.stack([padded[batch, ch, rows, cols] for ch in range(c)], dim=1)


def random_shift_on_device(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """random_shift for the CUDA fast path: the shifts come from x's device's RNG (no host copy, so it
    can be captured in a CUDA graph) and every channel is moved by one gather. Same translation and
    fill as random_shift; different random draws."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s,) * 4, value=-1.0).flatten(2)  # [b, c, (h+2s)*(w+2s)]
    off = torch.randint(0, 2 * s + 1, (2, b, 1, 1), device=x.device)
    rows = off[0] + torch.arange(h, device=x.device)[:, None]  # [b, h, 1]
    cols = off[1] + torch.arange(w, device=x.device)[None, :]  # [b, 1, w]
    flat = (rows * (w + 2 * s) + cols).view(b, 1, h * w).expand(b, c, h * w)
    return padded.gather(2, flat).view(b, c, h, w)


def seed_style_loader(split: Split, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The baseline's data path: a CPU DataLoader over a TensorDataset, batches copied per step."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    ds = torch.utils.data.TensorDataset(split.x, split.y)
    yield from torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)


# ------------------------------------------------------------------------------------- checkpoints


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0  # batches of `epoch` already done
    global_step: int = 0
    loss_sum: float = 0.0  # of this epoch's batches so far
    loss_count: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    # Losses still on the device: read back (one sync) only at a checkpoint or an epoch's end, not every
    # step, so that the CPU queues the next step while the GPU runs this one. Not checkpointed.
    _pending: list[torch.Tensor] = field(default_factory=list, repr=False)

    def add_loss(self, loss: float | torch.Tensor) -> None:
        if isinstance(loss, torch.Tensor):
            self._pending.append(loss.detach())
        else:
            self.loss_sum += loss
        self.loss_count += 1

    def flush(self) -> None:
        """Add the pending losses, one by one as floats, so the sum is the same wherever it was flushed."""
        if self._pending:
            for v in torch.stack(self._pending).float().tolist():
                self.loss_sum += v
            self._pending.clear()

    def state(self) -> dict[str, Any]:
        self.flush()
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def end_epoch(self, **values: float) -> None:
        self.flush()
        values = {"train_loss": self.loss_sum / max(1, self.loss_count), **values}
        for k, v in values.items():
            self.history.setdefault(k, []).append(v)
        self.epoch += 1
        self.step_in_epoch = 0
        self.loss_sum, self.loss_count = 0.0, 0


class Checkpoints:
    """Atomic checkpoints (write, fsync, rename) every `every` steps; the latest two are kept."""

    def __init__(self, rt: Runtime, every: int, name: str = "ckpt") -> None:
        self.rt = rt
        self.every = max(1, every)
        self.dir = rt.checkpoint_dir
        self.name = name

    def due(self, pos: Position) -> bool:
        return pos.global_step % self.every == 0

    def step_done(self, pos: Position, modules: dict[str, Any], stop_after: int = 0) -> None:
        """Count a finished step; checkpoint when due; with --stop-after, checkpoint and stop there."""
        pos.step_in_epoch += 1
        pos.global_step += 1
        stop = bool(stop_after) and pos.global_step >= stop_after
        if self.due(pos) or stop:
            self.save(pos, modules)
        if stop:
            raise Stopped()

    def save(self, pos: Position, modules: dict[str, Any]) -> None:
        position = pos.state()
        if not self.rt.is_main:
            return
        state = {
            "position": position,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "modules": {k: _unwrap(m).state_dict() for k, m in modules.items()},
        }
        path = self.dir / f"{self.name}-{pos.global_step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in sorted(self.dir.glob(f"{self.name}-*.pt"))[:-2]:
            old.unlink()

    def restore(self, modules: dict[str, Any]) -> Position | None:
        found = sorted(self.dir.glob(f"{self.name}-*.pt")) if self.dir.exists() else []
        if self.rt.distributed:  # every rank resumes from rank 0's choice
            obj = [str(found[-1]) if found else ""]
            torch.distributed.broadcast_object_list(obj, src=0)
            found = [Path(obj[0])] if obj[0] else []
        if not found:
            return None
        state = torch.load(found[-1], map_location=self.rt.device, weights_only=False)
        for k, m in modules.items():
            if isinstance(m, torch.optim.Optimizer):
                _load_optimizer(m, state["modules"][k])
            else:
                _unwrap(m).load_state_dict(state["modules"][k])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.rt.log(f"resumed from {found[-1].name} (step {state['position']['global_step']})")
        return Position(**state["position"])


_IMPLEMENTATION = ("fused", "foreach", "capturable")


def _load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """load_state_dict, keeping how this optimizer was built to run: a state dict carries the writer's
    fused/foreach/capturable flags (a CUDA fast run's fused, capturable Adam, or a CPU run's defaults),
    which would otherwise replace this run's. The step counters go where these flags keep them. A state
    written with this run's flags (every resume on the same device) is loaded unchanged."""
    built = [{k: g[k] for k in _IMPLEMENTATION if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, built, strict=True):
        if all(group.get(k) == v for k, v in flags.items()):
            continue
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                opt.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)


def _unwrap(m: Any) -> Any:
    return m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m


# ----------------------------------------------------------------------------------------- outputs


def write_rank_report(rt: Runtime, model: torch.nn.Module) -> None:
    """Every rank (on its own node) says who it was and a digest of its final weights, so a multi-node
    run can show that DDP kept all ranks identical."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(_unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    rt.output_dir.mkdir(parents=True, exist_ok=True)
    report = {"rank": rt.rank, "world_size": rt.world_size, "weights_sha256": digest.hexdigest()}
    (rt.output_dir / f"rank-{rt.rank}.json").write_text(json.dumps(report))


def write_metrics(rt: Runtime, metrics: dict[str, Any]) -> None:
    if rt.is_main:
        (rt.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print("metrics " + json.dumps(metrics, sort_keys=True), flush=True)


def plot_history(rt: Runtime, history: dict[str, list[float]], filename: str = "curves.png") -> None:
    """Loss and accuracy curves as a PNG: a person would rather look than read."""
    if not rt.is_main or not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(history)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot(range(1, len(history[key]) + 1), history[key])
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(rt.output_dir / filename, dpi=100)
    plt.close(fig)


class Throughput:
    """Samples per second over the timed steps (the first `warmup` steps are excluded), up to stop():
    the training loop, with its evaluations and checkpoints, but not the outputs written after it
    (plots, a judge's training, the final model), which are no training step."""

    def __init__(self, rt: Runtime, warmup: int = 5) -> None:
        self.rt, self.warmup = rt, warmup
        self.samples, self.steps, self.t0 = 0, 0, 0.0
        self.t1: float | None = None

    def step(self, n: int) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
        elif self.steps > self.warmup:
            self.samples += n

    def _sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()

    def stop(self) -> None:
        """The training loop is over: the clock stops here (after the device has finished)."""
        self._sync()
        self.t1 = time.perf_counter()

    @property
    def per_second(self) -> float:
        if self.t1 is None:
            self.stop()
        assert self.t1 is not None
        dt = self.t1 - self.t0 if self.t0 else 0.0
        return self.samples * self.rt.world_size / dt if dt > 0 else math.nan


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split, rt: Runtime, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(split), batch_size):
        x = split.x[i : i + batch_size].to(rt.device, non_blocking=True)
        if rt.fast and x.dim() == 4 and rt.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            logits = model(x)
        correct += int((logits.argmax(1) == split.y[i : i + batch_size].to(rt.device)).sum())
    model.train()
    return correct / len(split)


# ---------------------------------------------------------------------------------- CUDA fast steps


def fast_adam(params: Any, rt: Runtime, **kwargs: Any) -> torch.optim.Adam:
    """Adam as the run needs it: on CUDA's fast path the fused kernel (one launch for every parameter),
    capturable when steps are CUDA graphs; elsewhere torch's default, as before."""
    if rt.cuda_fast:
        return torch.optim.Adam(params, fused=True, capturable=rt.cuda_graphs, **kwargs)
    return torch.optim.Adam(params, **kwargs)


class CudaGraphStep:
    """One training step, `fn(idx) -> losses`, replayed as a CUDA graph on the CUDA fast path.

    `fn` takes a batch's indices (a device tensor) and does all of the step on the device: gather the
    batch from the device-resident dataset, augment, forward, backward, optimizer step; it returns
    detached loss tensors. A step of these small nets is ~100 kernels of a few microseconds each, so
    launching them one by one from Python costs far more than running them; a replayed graph is one
    launch and no host sync.

    - The first `warmup` full-size steps run eagerly on a side stream (cuDNN picks its algorithms,
      Adam creates its state), as torch.cuda.graph's docs require; the next full-size step is captured
      and replayed, and so is every later one: the indices are copied into the graph's input, the
      losses copied out of its outputs (the graph overwrites them at each replay).
    - A batch of another size (an epoch's last, smaller one) runs eagerly: nothing is dropped or
      padded, so every epoch trains on the same samples as the eager and CPU loops do.
    - Each warm-up, captured or eager step is one real training step on its batch, so the optimizer
      sees the same sequence of batches whatever ran it.
    - If capture fails (an op that syncs with the host, a driver without graph support), the job says
      so in one line and goes on eagerly: it never stops for it.
    After capture cuDNN's benchmark mode is turned off: the graph's convolutions were tuned at warm-up,
    and timing every other shape (the last batch, evaluation) would cost more than it saves.
    """

    def __init__(
        self, rt: Runtime, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], batch_size: int, warmup: int = 3
    ) -> None:
        self.rt, self.fn, self.batch_size, self.warmup = rt, fn, batch_size, warmup
        self.enabled = rt.cuda_graphs
        self.eager_calls = 0
        self.graph: Any = None
        self.static_idx: torch.Tensor | None = None
        self.static_out: tuple[torch.Tensor, ...] = ()

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.enabled or len(idx) != self.batch_size:
            return self.fn(idx)
        if self.graph is not None:
            assert self.static_idx is not None
            self.static_idx.copy_(idx)
            self.graph.replay()
            return tuple(t.clone() for t in self.static_out)
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            side = torch.cuda.Stream(self.rt.device)
            side.wait_stream(torch.cuda.current_stream(self.rt.device))
            with torch.cuda.stream(side):
                out = self.fn(idx)
            torch.cuda.current_stream(self.rt.device).wait_stream(side)
            return out
        return self._capture(idx)

    def _capture(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stream = torch.cuda.current_stream(self.rt.device)
        try:
            static_idx = idx.clone()
            torch.cuda.synchronize(self.rt.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(static_idx)
            graph.replay()  # the capture only recorded the step: this runs it, on this batch
        except Exception as e:  # any failure: train eagerly instead
            self.enabled = False
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.rt.log(f"note: CUDA graph capture failed ({type(e).__name__}: {first}); training eagerly")
            torch.cuda.set_stream(stream)  # a failed capture_end leaves its side stream current
            torch.cuda.synchronize(self.rt.device)
            return self.fn(idx)
        self.graph, self.static_idx, self.static_out = graph, static_idx, static_out
        torch.backends.cudnn.benchmark = False
        return tuple(t.clone() for t in static_out)


# ------------------------------------------------------------------------------ a classifier's loop


class Stopped(Exception):
    """--stop-after reached: the run ends here with a checkpoint, as if it were interrupted."""


def fit_classifier(
    args: argparse.Namespace,
    rt: Runtime,
    model: torch.nn.Module,
    train: Split,
    test: Split,
    *,
    image_model: bool = True,
    shift: int = 0,
) -> dict[str, Any]:
    """Train with cross-entropy and Adam, checkpointing and resuming exactly; returns the metrics.

    On CUDA's fast path each step runs on the device alone (indices, gather, augmentation) and is
    replayed as a CUDA graph (CudaGraphStep); elsewhere (CPU, --seed-style) the loop is as it was."""
    train = tile(train, args.repeat_data)
    model.to(rt.device)
    cuda_fast = rt.cuda_fast
    if cuda_fast and image_model:
        model = model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None
        )
    opt = fast_adam(model.parameters(), rt, lr=args.lr)
    modules = {"model": model, "optimizer": opt}
    ckpt = Checkpoints(rt, args.checkpoint_every)
    pos = ckpt.restore(modules) or Position()
    data = train.to(rt.device) if rt.fast else train  # small datasets live on the device
    speed = Throughput(rt)
    loss_fn = torch.nn.CrossEntropyLoss()

    def device_step(idx: torch.Tensor) -> tuple[torch.Tensor, ...]:  # the CUDA fast path's whole step
        x = random_shift_on_device(data.x[idx], shift)
        if image_model:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast(cache=False):
            loss = loss_fn(net(x), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return (loss.detach(),)

    fast_step = CudaGraphStep(rt, device_step, args.batch_size)
    while pos.epoch < args.epochs:
        if cuda_fast:
            for idx in device_batches(len(data), args.batch_size, pos.epoch, rt, args.seed, pos.step_in_epoch):
                (loss,) = fast_step(idx)
                speed.step(len(idx))
                pos.add_loss(loss)
                ckpt.step_done(pos, modules, args.stop_after)
        else:  # CPU, and --seed-style anywhere: the loop as it always was
            if rt.fast:
                steps: Iterator[tuple[torch.Tensor, ...]] = (
                    (data.x[idx], data.y[idx])
                    for idx in epoch_batches(len(data), args.batch_size, pos.epoch, rt, args.seed)[pos.step_in_epoch :]
                )
            else:
                steps = seed_style_loader(data, args.batch_size, args.seed, pos.epoch)
            for x, y in steps:
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                x = random_shift(x, shift)
                loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                speed.step(len(y))
                pos.add_loss(loss if rt.fast else float(loss.detach()))  # seed-style: a sync per step, as it was
                ckpt.step_done(pos, modules, args.stop_after)
        pos.end_epoch(test_accuracy=accuracy(model, test, rt))
        rt.log(
            f"epoch {pos.epoch}/{args.epochs} loss {pos.history['train_loss'][-1]:.4f} "
            f"test_accuracy {pos.history['test_accuracy'][-1]:.4f}"
        )
        ckpt.save(pos, modules)
    speed.stop()
    if rt.is_main:
        torch.save(model.state_dict(), rt.output_dir / "model.pt")
    write_rank_report(rt, model)
    plot_history(rt, pos.history)
    return {
        "test_accuracy": pos.history["test_accuracy"][-1],
        "train_loss": pos.history["train_loss"][-1],
        "epochs": args.epochs,
        "samples_per_second": round(speed.per_second, 1),
        "device": str(rt.device),
        "dataset": args.dataset,
        "world_size": rt.world_size,
    }


def run_job(args: argparse.Namespace, body: Callable[[Runtime], dict[str, Any]]) -> int:
    """Set up, run the job's body, write its metrics; --stop-after ends early with a checkpoint."""
    rt = setup(args)
    try:
        write_metrics(rt, body(rt))
    except Stopped:
        rt.log("stopped early (--stop-after): a checkpoint is saved; run again to resume")
    finally:
        teardown(rt)
    return 0
