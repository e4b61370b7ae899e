#!/usr/bin/env python
"""Pre-train a public class-conditional latent diffusion model (non-private), in two stages, under Accelerate.

    accelerate launch examples/pretrain_public_ldm.py --dataset_name=drawn_digits --output_dir=public-ldm

Stage (a) trains the ``AutoencoderKL`` on images; stage (b) freezes it and trains the ``UNet2DConditionModel`` plus
the ``ClassEmbedder`` on its latents (DDPM loss, labels dropped to the null class for classifier-free guidance).
The result is a ``DPLDMPipeline`` folder with a model card that names the public data and a sample grid.

Only ever feed PUBLIC data here: nothing in this script is private. Private data goes to ``train_dp_ldm.py``.
Each stage is saved as soon as it ends, and checkpointed every ``--checkpointing_steps`` while it runs, so after an
interruption ``--resume`` skips finished stages and continues an unfinished one from its last checkpoint. To train a
longer or larger diffusion stage on the autoencoder of an existing model, pass ``--pretrained_vae_model_name_or_path``
(stage (a) is then skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dp_diffusers import ClassEmbedder, DPLDMPipeline, UserInputError
from dp_diffusers.atomic import atomic_directory
from dp_diffusers.checkpointing import load_checkpoint, save_checkpoint, set_rng_state
from dp_diffusers.data import as_torch_dataset, load_image_dataset
from dp_diffusers.errors import cli_message, first_line
from dp_diffusers.families.presets import PAPER_FINE_TUNE
from dp_diffusers.grids import pipeline_class_grid
from dp_diffusers.model_card import public_model_card
from dp_diffusers.models.configs import TINY, LDMConfig, build_class_conditional_ldm
from dp_diffusers.runtime import multi_process_cpu
from dp_diffusers.trainable import SCOPES

logger = get_logger(__name__)


#: This script's flags for the library parameters its errors may name (dp_diffusers.errors.cli_message).
FLAGS = {
    "split": "--dataset_split",
    "image_column": "--image_column",
    "label_column": "--label_column",
    "resolution": "--resolution",
    "channels": "--channels",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset_name",
        default="drawn_digits",
        help="PUBLIC data: a preset (drawn_digits: the shipped digit model's data; printed_digits, procedural, ...), "
        "a Hub id, a local folder or parquet file.",
    )
    p.add_argument("--dataset_split", default="train")
    p.add_argument("--image_column", default=None, help="Image column (default: the preset's or 'image').")
    p.add_argument("--label_column", default=None, help="Label column (default: the preset's or 'label').")
    p.add_argument(
        "--num_generated_images",
        "--num_printed_digits",
        type=int,
        default=20000,
        help="Images to generate for the generated presets (printed_digits, drawn_digits, procedural).",
    )
    p.add_argument(
        "--preprocessing_num_workers",
        type=int,
        default=None,
        help="Processes that draw a generated preset (the same images; drawn_digits draws 250-550 images/s in one).",
    )
    p.add_argument("--resolution", type=int, default=28, help="Image side, a multiple of 4.")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3], help="1 = grayscale, 3 = RGB.")
    p.add_argument(
        "--model_size",
        default="default",
        choices=["default", "tiny"],
        help="'default' is the shipped layout; 'tiny' is for tests. The three flags below change its denoiser.",
    )
    p.add_argument(
        "--unet_block_out_channels",
        type=int,
        nargs="+",
        default=None,
        help="The UNet's block_out_channels, one width per level (default: --model_size's; the shipped: 32 64).",
    )
    p.add_argument(
        "--unet_layers_per_block",
        type=int,
        default=None,
        help="The UNet's layers_per_block: ResNet + attention layers per level (default: --model_size's, 1).",
    )
    p.add_argument(
        "--unet_norm_num_groups",
        type=int,
        default=None,
        help="GroupNorm groups of the UNet, a divisor of every width (default: --model_size's, 32; 16 for 48 96).",
    )
    p.add_argument("--output_dir", default="public-ldm", help="Where the DPLDMPipeline folder is written.")
    p.add_argument("--train_batch_size", type=int, default=128)
    p.add_argument("--vae_train_steps", type=int, default=2000, help="Stage (a) optimizer steps.")
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the autoencoder's KL term.")
    p.add_argument("--unet_train_steps", type=int, default=8000, help="Stage (b) optimizer steps.")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Stage (b) learning rate.")
    p.add_argument("--lr_scheduler", default="cosine")
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--cond_drop_prob", type=float, default=0.1, help="Label dropout for classifier-free guidance.")
    p.add_argument("--ema_decay", type=float, default=0.999, help="EMA of stage (b) weights; 0 disables.")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_grid_per_class", type=int, default=8)
    p.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="Reuse this AutoencoderKL (a folder or Hub id of the VAE itself, e.g. "
        "dp_diffusers/assets/public-drawn-digits-wide/vae) and skip stage (a).",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="Reuse finished stages (kept in .OUTPUT_DIR.stages beside OUTPUT_DIR) and continue an unfinished one "
        "from its last checkpoint.",
    )
    p.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Checkpoint a running stage every N steps (for --resume); 0: only at the end of each stage.",
    )
    p.add_argument("--logging_steps", type=int, default=50)
    rec = p.add_argument_group(
        "fine-tuning recommendation",
        "Written to pretraining.json (fine_tune_defaults) and the card: what train_dp_ldm.py trains from this model, "
        "and how fast, when its user does not say. Unset: the paper's (the attention blocks, 1e-3).",
    )
    rec.add_argument(
        "--fine_tune_trainable_scope",
        default=None,
        choices=SCOPES,
        help="train_dp_ldm.py's default --trainable_scope from this model (e.g. attention_up_resnets for a prior far "
        "from the private data).",
    )
    rec.add_argument(
        "--fine_tune_learning_rate",
        type=float,
        default=None,
        help="train_dp_ldm.py's default --learning_rate from this model (default with a scope: 1e-3).",
    )
    args = p.parse_args(argv)
    if args.resolution % 4:
        p.error(f"--resolution must be a multiple of 4, got {args.resolution}.")
    base = TINY if args.model_size == "tiny" else LDMConfig()
    widths = args.unet_block_out_channels or base.unet_channels
    groups = args.unet_norm_num_groups or base.norm_num_groups
    if args.unet_block_out_channels is not None and len(widths) < 2:
        p.error(f"--unet_block_out_channels needs a width per level, at least 2, got {widths}.")
    if any(w < 1 or w % groups for w in widths):
        p.error(f"UNet widths {list(widths)} must be positive multiples of its --unet_norm_num_groups ({groups}).")
    if args.unet_layers_per_block is not None and args.unet_layers_per_block < 1:
        p.error(f"--unet_layers_per_block must be >= 1, got {args.unet_layers_per_block}.")
    if args.checkpointing_steps < 0:
        p.error(f"--checkpointing_steps must be >= 0, got {args.checkpointing_steps}.")
    if args.preprocessing_num_workers is not None and args.preprocessing_num_workers < 1:
        p.error(f"--preprocessing_num_workers must be >= 1, got {args.preprocessing_num_workers}.")
    if args.fine_tune_learning_rate is not None and not 0 < args.fine_tune_learning_rate < float("inf"):
        p.error(f"--fine_tune_learning_rate must be a positive number, got {args.fine_tune_learning_rate}.")
    return args


def fine_tune_recommendation(args) -> dict | None:
    """pretraining.json's ``fine_tune_defaults`` (read by ``dp_diffusers.families.fine_tune_defaults``), or None."""
    if args.fine_tune_trainable_scope is None and args.fine_tune_learning_rate is None:
        return None
    rate = args.fine_tune_learning_rate if args.fine_tune_learning_rate is not None else PAPER_FINE_TUNE.learning_rate
    return {"trainable_scope": args.fine_tune_trainable_scope, "learning_rate": rate}


def infinite(loader):
    while True:
        yield from loader


def named_parameters(models: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": p for prefix, model in models.items() for name, p in model.named_parameters()}


# Mid-stage checkpoints reuse dp_diffusers.checkpointing (weights as safetensors, the rest read back with
# weights_only=True). Accelerate's save_state is not used: it numbers every model prepared so far in the process, so
# a stage (b) resumed after a skipped stage (a) would read the autoencoder's file into the UNet.
def save_stage_checkpoint(directory, models: dict, optimizer, lr_scheduler, *, step: int, ema=None, **extra) -> None:
    """Writes ``directory`` atomically: the stage's weights, EMA, optimizer, schedule, step and ``extra``."""
    named = named_parameters(models)
    state = {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), **extra}
    ema_tensors = None
    if ema is not None:
        state["ema_step"] = ema.optimization_step
        ema_tensors = dict(zip(named, ema.shadow_params, strict=True))
    save_checkpoint(directory, trained=named, state=state, ema=ema_tensors)


def resume_stage(args, directory: Path, models: dict, optimizer, lr_scheduler, *, ema=None, stage: str) -> dict:
    """With --resume and a checkpoint in ``directory``: puts back what :func:`save_stage_checkpoint` wrote (weights,
    optimizer, schedule, EMA, RNG) and returns its state (``step``, ``seconds`` and the extras); else a fresh state."""
    if not (args.resume and directory.is_dir()):
        return {"step": 0, "seconds": 0.0}
    trained, ema_tensors, state = load_checkpoint(directory)
    named = named_parameters(models)
    if sorted(trained) != sorted(named) or any(trained[n].shape != p.shape for n, p in named.items()):
        raise UserInputError(
            f"{directory} holds another model layout than this run builds: resume with the same --model_size, "
            "--unet_* flags, --resolution, --channels and data, or delete that folder to start the stage over."
        )
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(trained[n])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None and ema_tensors is not None:
        ema.shadow_params = [ema_tensors[n].to(p.device).clone() for n, p in named.items()]
        ema.optimization_step = int(state["ema_step"])
    set_rng_state(state["rng"][0])  # the main process's stream, as it stood at the checkpoint (public data)
    logger.info(f"Resumed stage ({stage}) from {directory} at step {state['step']}")
    return state


def checkpoint_due(args, step: int, total: int) -> bool:
    """After optimizer step ``step`` (1-based): a checkpoint is due every --checkpointing_steps, but not at the end
    (the finished stage is saved whole)."""
    return bool(args.checkpointing_steps) and step % args.checkpointing_steps == 0 and step < total


def train_vae(args, accelerator, vae: AutoencoderKL, loader, checkpoint_dir: Path) -> tuple[AutoencoderKL, float]:
    """Stage (a): reconstruction (MSE) + a small KL term; no discriminator or perceptual net (none offline).
    Returns the autoencoder and the stage's seconds (over all resumed runs)."""
    started = time.time()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    lr = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.vae_train_steps
    )
    vae, optimizer, loader, lr = accelerator.prepare(vae, optimizer, loader, lr)
    models = {"vae": accelerator.unwrap_model(vae)}
    state = resume_stage(args, checkpoint_dir, models, optimizer, lr, stage="a")
    start, seconds_before = int(state["step"]), float(state["seconds"])
    vae.train()
    batches = infinite(loader)
    bar = tqdm(
        range(start, args.vae_train_steps),
        initial=start,
        total=args.vae_train_steps,
        desc="stage (a) autoencoder",
        disable=not accelerator.is_main_process,
    )
    for step in bar:
        x = next(batches)["pixel_values"]
        with accelerator.autocast():
            posterior = accelerator.unwrap_model(vae).encode(x).latent_dist
            recon = accelerator.unwrap_model(vae).decode(posterior.sample()).sample
            rec_loss = F.mse_loss(recon.float(), x.float())
            kl = posterior.kl().mean()
            loss = rec_loss + args.kl_weight * kl
        accelerator.backward(loss)
        optimizer.step()
        lr.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.logging_steps == 0:
            bar.set_postfix(mse=f"{rec_loss.item():.4f}", kl=f"{kl.item():.1f}")
            accelerator.log({"vae/mse": rec_loss.item(), "vae/kl": kl.item()}, step=step)
        if checkpoint_due(args, step + 1, args.vae_train_steps) and accelerator.is_main_process:
            seconds = seconds_before + time.time() - started
            save_stage_checkpoint(checkpoint_dir, models, optimizer, lr, step=step + 1, seconds=seconds)
    return accelerator.unwrap_model(vae).eval(), seconds_before + time.time() - started


@torch.no_grad()
def encode_dataset(accelerator, vae: AutoencoderKL, loader):
    """Latent means and std of the whole dataset (frozen encoder); returns (mean, std, labels) on CPU."""
    means, stds, labels = [], [], []
    for batch in tqdm(loader, desc="encoding latents", disable=not accelerator.is_main_process):
        dist = vae.encode(batch["pixel_values"].to(accelerator.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        labels.append(batch["labels"])
    return torch.cat(means), torch.cat(stds), torch.cat(labels)


def train_diffusion(
    args, accelerator, unet, embedder, latents_mean, latents_std, labels, scaling_factor, scheduler, checkpoint_dir
):
    """Stage (b): epsilon-prediction DDPM loss on scaled latents, label dropout to the null class. Returns the UNet,
    the embedder, the loss summary and the stage's seconds (over all resumed runs)."""
    started = time.time()
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    params = list(unet.parameters()) + list(embedder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    lr = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.unet_train_steps
    )
    ema = EMAModel(params, decay=args.ema_decay) if args.ema_decay > 0 else None
    data = torch.utils.data.TensorDataset(latents_mean, latents_std, labels)
    loader = torch.utils.data.DataLoader(data, batch_size=args.train_batch_size, shuffle=True, drop_last=True)
    unet, embedder, optimizer, loader, lr = accelerator.prepare(unet, embedder, optimizer, loader, lr)
    models = {"unet": accelerator.unwrap_model(unet), "embedder": accelerator.unwrap_model(embedder)}
    state = resume_stage(args, checkpoint_dir, models, optimizer, lr, ema=ema, stage="b")
    if not math.isclose(state.get("scaling_factor", scaling_factor), scaling_factor, rel_tol=1e-4):
        raise UserInputError(
            f"{checkpoint_dir} was trained on the latents of another autoencoder (scaling factor "
            f"{state['scaling_factor']:.5f}, now {scaling_factor:.5f}): delete it to start stage (b) over."
        )
    start, seconds_before = int(state["step"]), float(state["seconds"])
    first, running = state.get("first_loss"), state.get("running_loss")
    unet.train()
    embedder.train()
    batches = infinite(loader)
    null_id = accelerator.unwrap_model(embedder).null_class_id
    bar = tqdm(
        range(start, args.unet_train_steps),
        initial=start,
        total=args.unet_train_steps,
        desc="stage (b) diffusion",
        disable=not accelerator.is_main_process,
    )
    for step in bar:
        mean, std, y = next(batches)
        z = (mean + std * torch.randn_like(std)) * scaling_factor
        drop = torch.rand(y.shape, device=y.device) < args.cond_drop_prob
        y = torch.where(drop, torch.full_like(y, null_id), y)
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z.shape[0],), device=z.device)
        noisy = noise_scheduler.add_noise(z, noise, t)
        with accelerator.autocast():
            pred = unet(noisy, t, encoder_hidden_states=embedder(y)).sample
            loss = F.mse_loss(pred.float(), noise.float())
        accelerator.backward(loss)
        optimizer.step()
        lr.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        if running is None:
            first = running = loss.item()
        running = 0.98 * running + 0.02 * loss.item()
        if step % args.logging_steps == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            accelerator.log({"diffusion/loss": loss.item()}, step=step)
        if checkpoint_due(args, step + 1, args.unet_train_steps) and accelerator.is_main_process:
            save_stage_checkpoint(
                checkpoint_dir,
                models,
                optimizer,
                lr,
                step=step + 1,
                ema=ema,
                seconds=seconds_before + time.time() - started,
                first_loss=first,
                running_loss=running,
                scaling_factor=scaling_factor,
            )
    unet, embedder = accelerator.unwrap_model(unet), accelerator.unwrap_model(embedder)
    if ema is not None:
        ema.copy_to(params)
    losses = {"first_loss": first, "final_loss_ema": running}
    return unet.eval(), embedder.eval(), losses, seconds_before + time.time() - started


def load_pretrained_vae(name_or_path: str, cfg: LDMConfig, args) -> AutoencoderKL:
    """``--pretrained_vae_model_name_or_path``: an ``AutoencoderKL`` whose latents fit the UNet that ``cfg`` builds
    (checked before any data is loaded)."""
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserInputError(
            f"--pretrained_vae_model_name_or_path {name_or_path!r}: no AutoencoderKL there ({first_line(e)}). Name "
            "the VAE folder itself, e.g. dp_diffusers/assets/public-drawn-digits-wide/vae."
        ) from e
    if vae.config.in_channels != args.channels:
        raise UserInputError(
            f"--pretrained_vae_model_name_or_path {name_or_path!r} encodes {vae.config.in_channels}-channel images, "
            f"this run has --channels {args.channels}."
        )
    with torch.no_grad():
        shape = vae.encode(torch.zeros(1, args.channels, args.resolution, args.resolution)).latent_dist.mean.shape
    side = dataclasses.replace(cfg, image_size=args.resolution).latent_size  # the UNet's sample_size
    if tuple(shape[1:]) != (cfg.latent_channels, side, side):
        raise UserInputError(
            f"--pretrained_vae_model_name_or_path {name_or_path!r} makes latents of shape {tuple(shape[1:])} from "
            f"{args.resolution}x{args.resolution} images; this run's UNet (--model_size {args.model_size}) takes "
            f"{(cfg.latent_channels, side, side)}."
        )
    return vae


def model_config(args) -> LDMConfig:
    """--model_size's layout with the --unet_* flags' changes (the autoencoder keeps its own GroupNorm groups)."""
    base = TINY if args.model_size == "tiny" else LDMConfig()
    unet = {
        "unet_channels": tuple(args.unet_block_out_channels or base.unet_channels),
        "layers_per_block": args.unet_layers_per_block or base.layers_per_block,
    }
    if args.unet_norm_num_groups is None:
        return dataclasses.replace(base, **unet)
    # LDMConfig.norm_num_groups serves both models: build_vae caps it at the autoencoder's narrowest width, and the
    # autoencoder of a fresh stage (a) must not change with a UNet flag, so it is set only for the UNet here.
    return dataclasses.replace(base, **unet, unet_norm_num_groups=args.unet_norm_num_groups)


def describe_timings(timings: dict) -> str:
    """The card's words for ``timings``: each stage's seconds (over every run that trained it), then this run's."""
    names = {"vae_seconds": "autoencoder", "diffusion_seconds": "diffusion", "this_run_seconds": "this run"}
    return ", ".join(f"{names[key]} {seconds:,.0f} s" for key, seconds in timings.items() if key in names)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(args) -> None:
    accelerator = Accelerator(cpu=multi_process_cpu(), mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO, force=True)
    set_seed(args.seed)
    started = time.time()
    output_dir = Path(args.output_dir)
    stages = output_dir.parent / f".{output_dir.name}.stages"

    base = model_config(args)
    vae = None
    if args.pretrained_vae_model_name_or_path:
        vae = load_pretrained_vae(args.pretrained_vae_model_name_or_path, base, args)

    loaded = load_image_dataset(
        args.dataset_name,
        split=args.dataset_split,
        image_column=args.image_column,
        label_column=args.label_column,
        num_generated_images=args.num_generated_images,
        seed=args.seed,
        num_proc=args.preprocessing_num_workers,
    )
    if loaded.label_column is None:
        raise UserInputError("Pre-training a class-conditional model needs labels: pass --label_column.")
    train_set = as_torch_dataset(loaded, resolution=args.resolution, channels=args.channels)
    logger.info(f"Public data: {loaded.source}, {len(train_set)} images, classes {loaded.id2label}")

    cfg = dataclasses.replace(
        base, image_size=args.resolution, in_channels=args.channels, num_classes=len(loaded.id2label)
    )
    parts = build_class_conditional_ldm(cfg, id2label=loaded.id2label)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True, drop_last=True)

    # Stage (a): the autoencoder.
    timings = {}
    if vae is not None:
        logger.info(f"Stage (a) skipped: the autoencoder of {args.pretrained_vae_model_name_or_path}")
    elif args.resume and (stages / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(stages / "vae")
        logger.info(f"Resumed finished stage (a) from {stages / 'vae'}")
    else:
        vae, seconds = train_vae(args, accelerator, parts["vae"], loader, stages / "vae-checkpoint")
        timings["vae_seconds"] = round(seconds, 1)
        if accelerator.is_main_process:
            with atomic_directory(stages / "vae") as tmp:
                vae.save_pretrained(tmp)
            shutil.rmtree(stages / "vae-checkpoint", ignore_errors=True)
    vae.requires_grad_(False).to(accelerator.device)

    # Latent scale: unit variance of the scaled latents, as Stable Diffusion's scaling_factor does.
    eval_loader = torch.utils.data.DataLoader(train_set, batch_size=256, shuffle=False)
    mean, std, labels = encode_dataset(accelerator, vae, eval_loader)
    scaling_factor = float(1.0 / torch.sqrt(mean.var() + (std**2).mean()))
    vae.register_to_config(scaling_factor=scaling_factor)

    # Stage (b): the class-conditional diffusion model.
    if args.resume and (stages / "unet" / "config.json").exists():
        unet = UNet2DConditionModel.from_pretrained(stages / "unet")
        embedder = ClassEmbedder.from_pretrained(stages / "embedder")
        losses = None
        logger.info(f"Resumed finished stage (b) from {stages}")
    else:
        unet, embedder, losses, seconds = train_diffusion(
            args,
            accelerator,
            parts["unet"],
            parts["embedder"],
            mean,
            std,
            labels,
            scaling_factor,
            parts["scheduler"],
            stages / "unet-checkpoint",
        )
        timings["diffusion_seconds"] = round(seconds, 1)
        if accelerator.is_main_process:
            for name, model in (("unet", unet), ("embedder", embedder)):
                with atomic_directory(stages / name) as tmp:
                    model.save_pretrained(tmp)
            shutil.rmtree(stages / "unet-checkpoint", ignore_errors=True)

    if not accelerator.is_main_process:
        return
    pipe = DPLDMPipeline(
        vae=vae,
        unet=unet,
        embedder=embedder,
        scheduler=parts["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    attention = sum(count(m) for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    parameters = {
        "total": count(vae) + count(unet) + count(embedder),
        "autoencoder": count(vae),
        "unet": count(unet),
        "unet attention blocks (Transformer2DModel)": attention,
        "class embedder": count(embedder),
    }
    # This process's wall-clock; a stage's own seconds (above) add up over the resumed runs that trained it.
    timings["this_run_seconds"] = round(time.time() - started, 1)
    command = "accelerate launch examples/pretrain_public_ldm.py " + " ".join(sys.argv[1:])
    recommendation = fine_tune_recommendation(args)
    vae_training = f"{args.vae_train_steps} steps"
    if args.pretrained_vae_model_name_or_path:
        vae_training = f"not trained here, reused from `{args.pretrained_vae_model_name_or_path}`"
    with atomic_directory(output_dir) as tmp:
        pipe.save_pretrained(tmp)
        pipeline_class_grid(pipe, per_class=args.num_grid_per_class, seed=args.seed).save(tmp / "samples.png")
        training = (
            f"Command: `{command}`\n\nStage (a) autoencoder: {vae_training}; stage (b) diffusion: "
            f"{args.unet_train_steps} steps, batch {args.train_batch_size}, lr {args.learning_rate}, "
            f"EMA {args.ema_decay}, label dropout {args.cond_drop_prob}. Wall-clock: {describe_timings(timings)} "
            f"on {accelerator.device} ({accelerator.num_processes} process(es))."
        )
        public_model_card(
            model_name=output_dir.name,
            public_data=loaded.source,
            training=training,
            parameters=parameters,
            repo_or_path=str(output_dir),
            grid="samples.png",
            datasets=[loaded.preset.hub_id] if loaded.preset is not None and loaded.preset.hub_id else None,
            fine_tune=recommendation,
        ).save(tmp / "README.md")
        (tmp / "pretraining.json").write_text(
            json.dumps(
                {
                    "public_data": loaded.source,
                    "num_images": len(train_set),
                    **(
                        {"pretrained_vae": args.pretrained_vae_model_name_or_path}
                        if args.pretrained_vae_model_name_or_path
                        else {}
                    ),
                    "parameters": parameters,
                    "timings": timings,
                    "diffusion_loss": losses,
                    "command": command,
                    **({"fine_tune_defaults": recommendation} if recommendation else {}),
                },
                indent=2,
            )
        )
    shutil.rmtree(stages, ignore_errors=True)  # finished: the stage folders only served --resume
    seconds = timings["this_run_seconds"]
    logger.info(f"Wrote {output_dir} ({parameters['total']:,} parameters) in {seconds:.0f}s (this run)")


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserInputError as e:
        print(f"error: {cli_message(e, FLAGS)}", file=sys.stderr)
        sys.exit(2)
