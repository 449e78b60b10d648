"""Resumable DDPM training of a diffusers UNet2DModel on Fashion-MNIST.

The run folder holds everything: `checkpoint.pt` (weights, EMA, optimizer; tensors only, loaded
with weights_only=True), `log.jsonl` (loss and wall time), and `model/`, the EMA weights as a
diffusers pipeline folder, refreshed at every checkpoint so it can be sampled while training runs.
Batches and noise are a pure function of (seed, step): a resumed run sees the data a straight run
would have seen.
"""

from __future__ import annotations

import io
import json
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from ..data import load_fashion_mnist
from ..errors import QtoolkitError
from ..io import atomic_write_bytes, atomic_write_text
from ..models.loading import DEFAULT_SCHEDULER_CONFIG, save_diffusion_model
from ..progress import progress_bar
from .config import TrainConfig

# The bundled model: 2.6M parameters; residual blocks with GroupNorm+SiLU, skip concatenations,
# self-attention at 16x16 and the sinusoidal timestep embedding -- the parts that make diffusion
# PTQ hard -- at a size that trains on a 2-core CPU in hours.
FMNIST_UNET_CONFIG = dict(
    sample_size=32, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16, attention_head_dim=32,
)
# The schedule it is trained on, and how it samples: Ho et al.'s linear betas, without clipping the
# predicted x_0 (measured at step 2,900 on 500 DDIM samples, classifier features: clipping removes the
# speckle of some samples but moves the set away from the data, FID 45 and recall 0.30 against about 28
# and 0.77 unclipped).
FMNIST_SCHEDULER_CONFIG = {**DEFAULT_SCHEDULER_CONFIG, "clip_sample": False}


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    # Warm-up of the decay so early EMA weights are not dominated by the random init.
    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def _truncate_log(log_path: Path, step: int) -> None:
    if log_path.exists():
        rows = [r for r in log_path.read_text().splitlines() if json.loads(r)["step"] <= step]
        atomic_write_text(log_path, "".join(r + "\n" for r in rows))


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_ddpm(run_dir: Path, cfg: TrainConfig, data_root: str | None = None) -> Path:
    """Train (or resume) until `cfg.steps`; returns the folder of the exported EMA model."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path, cfg_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl", run_dir / "train_config.json"
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        changed = {k for k in ("batch_size", "seed", "lr", "warmup_steps", "ema_decay") if saved.get(k) != asdict(cfg)[k]}
        if changed:
            raise QtoolkitError(f"{run_dir} was started with other {sorted(changed)} ({saved}); resume with the same settings or pick a new --out")
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    images, _ = load_fashion_mnist("train", data_root)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what the seed reproduces
    model = UNet2DModel(**FMNIST_UNET_CONFIG).to(device)
    ema = UNet2DModel(**FMNIST_UNET_CONFIG).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = DDPMScheduler(**FMNIST_SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    step, wall = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, wall = int(state["step"]), float(state["wall_seconds"])
        print(f"resuming {run_dir} at step {step} ({wall / 3600:.2f} h so far)")
    _truncate_log(log_path, step)  # rows written after the last checkpoint will be written again

    stop = {"now": False}

    def request_stop(signum, frame):  # finish the current step, checkpoint, exit cleanly
        stop["now"] = True

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint():
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(),
                                     "optimizer": opt.state_dict(), "step": step, "wall_seconds": wall})
        save_diffusion_model(ema, FMNIST_SCHEDULER_CONFIG, run_dir / "model", overwrite=True)

    n = len(images)
    steps_per_epoch = n // cfg.batch_size
    model.train()
    losses = []
    with progress_bar(cfg.steps, "train ddpm", unit="step", completed=step) as bar:
        try:
            while step < cfg.steps and not stop["now"]:
                t0 = time.perf_counter()
                epoch, i = divmod(step, steps_per_epoch)
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
                x0 = images[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]].to(device)
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g).to(device)
                noise = torch.randn(x0.shape, generator=g).to(device)
                a = alphas_cumprod[t].view(-1, 1, 1, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    pred = model(xt, t).sample
                loss = F.mse_loss(pred.float(), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                _ema_update(ema, model, step, cfg.ema_decay)
                step += 1
                wall += time.perf_counter() - t0
                losses.append(loss.item())
                bar.advance()
                bar.update(description=f"train ddpm (loss {loss.item():.4f})")
                if step % 50 == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": sum(losses) / len(losses), "wall_seconds": round(wall, 1)}) + "\n")
                    losses.clear()
                if step % cfg.checkpoint_every == 0:
                    checkpoint()
            checkpoint()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
    return run_dir / "model"
