"""Training runs for tests/test_training.py that need their own process: a fresh process to resume in, one
to SIGKILL mid-epoch, and the ranks of a torchrun job. Also imported by the tests for the shared set-up.

    python tests/_train_worker.py train OUT_DIR [--resume] [--slow] [--weights FILE]
    torchrun --nproc_per_node=2 tests/_train_worker.py ddp OUT_DIR
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from robust_ext.data import ImageDataset, load_dataset
from robust_ext.models import build_model
from robust_ext.training import TrainConfig, train

# The resume tests' run: FGSM-RS (so the attacks' random starts matter), Adam (state), a per-batch
# schedule, two epochs of 12 batches. Fixed thread count: bit-identity across processes needs the same one.
RESUME_CONFIG = dict(method="fgsm_rs", eps=0.1, epochs=2, batch_size=32, lr=2e-3, scheduler="cyclic",
                     eval_samples=32, seed=7, threads=1, log_every=1, progress=False)
RESUME_N = 384
DDP_CONFIG = dict(method="standard", epochs=1, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9,
                  seed=3, progress=False, plot=False)


@functools.lru_cache(maxsize=None)
def _full(split: str) -> ImageDataset:
    return load_dataset("mnist5k", split=split)


def subset(n: int, split: str = "train") -> ImageDataset:
    full = _full(split)
    return ImageDataset(full.images[:n].clone(), full.labels[:n].clone(), name="mnist5k", split=split,
                        classes=full.classes, source=full.source)


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn")


class Recording(Dataset):
    """A (non-tensor) dataset that records which indices it served."""

    def __init__(self, base):
        self.base, self.seen = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.base[i]


def run_train(out: Path, resume: bool, slow: bool, weights: Path | None) -> None:
    model = fresh_model()
    if slow:  # widen the window in which the test kills this process; hooks change no numbers
        model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    train(model, subset(RESUME_N), subset(32, "test"), TrainConfig(out_dir=str(out), **RESUME_CONFIG), resume=resume)
    if weights is not None:
        torch.save(model.state_dict(), weights)


def run_ddp(out: Path) -> None:
    data = Recording(subset(512))
    model = fresh_model()
    result = train(model, data, None, TrainConfig(out_dir=str(out / "run"), **DDP_CONFIG))
    rank = int(os.environ["RANK"])
    torch.save({"state_dict": model.state_dict(), "seen": data.seen, "history": result.history},
               out / f"rank{rank}.pt")
    # A second run in the same job joins the group the first one created: adversarial training with
    # clean/adversarial mixing, evaluation and the guard.
    initialized = torch.distributed.is_initialized()
    result = train(fresh_model(), subset(256), subset(64, "test"), method="fgsm_rs", eps=0.1, mix_ratio=0.5,
                   epochs=2, batch_size=64, eval_samples=64, progress=False, plot=False, seed=5,
                   out_dir=str(out / "adv"))
    torch.save({"history": result.history, "stop_reason": result.stop_reason, "initialized": initialized},
               out / f"adv_rank{rank}.pt")


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("train", "ddp"))
    p.add_argument("out", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow", action="store_true")
    p.add_argument("--weights", type=Path)
    a = p.parse_args(argv)
    if a.what == "train":
        run_train(a.out, a.resume, a.slow, a.weights)
    else:
        run_ddp(a.out)


if __name__ == "__main__":
    sys.exit(main())
