#!/usr/bin/env python
"""Differentially private fine-tuning of a latent diffusion model's attention modules (DP-LDM, arXiv 2305.15759).

    accelerate launch train_dp_ldm.py --epsilon=10                      # embedded defaults, a few minutes on a CPU
    accelerate launch train_dp_ldm.py --dataset_name=mnist --epsilon=10 --output_dir=dp-ldm-mnist

A public latent diffusion model (default: the shipped digit model, drawn digits) is fine-tuned on private images with
DP-SGD (Opacus: Poisson sampling, per-example clipping, Gaussian noise, an accountant). Only the attention blocks and
the conditioning embedder train; every other weight stays bit-identical. The output folder is a diffusers pipeline
with ``privacy.json`` and a privacy model card, and can be pushed to the Hub.

The script reads top to bottom: arguments, model family, private data, trainable parameters, privacy engine,
resume, training loop, outputs. The privacy engine (``dp_diffusers.privacy``) knows nothing of diffusion; the model
family (``dp_diffusers.families``) knows nothing of Opacus; this script wires them together.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import dp_diffusers
from dp_diffusers import UserInputError
from dp_diffusers.atomic import atomic_directory
from dp_diffusers.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dp_diffusers.data import PRESETS, as_torch_dataset, load_image_dataset, parse_class_names
from dp_diffusers.data.latent_cache import LatentCache, cache_key
from dp_diffusers.data.loading import drop_unreadable_images, no_labels_error
from dp_diffusers.errors import cli_message, first_line, parser_flags
from dp_diffusers.families import (
    DEFAULT_PROMPT_TEMPLATE,
    FamilyOptions,
    ModelFamily,
    check_base_model,
    fine_tune_defaults,
    load_family,
    parse_label_map,
    resolve_base_model,
)
from dp_diffusers.lora import save_pipeline_with_lora
from dp_diffusers.model_card import private_model_card
from dp_diffusers.privacy import (
    GRAD_SAMPLE_MODES,
    DPEngine,
    PrivacyConfig,
    epsilon_after,
    format_epsilon,
    repeat_rows,
    steps_per_epoch,
)
from dp_diffusers.runtime import multi_process_cpu, retain_freed_memory
from dp_diffusers.trainable import DEFAULT_LORA_RANK, SCOPE_DESCRIPTIONS, SCOPES, TrainableConfig, select_trainable

logger = get_logger(__name__)

#: The card's hyper-parameter line for the embedded demo, whose defaults were picked by looking at its data.
DEMO_TUNING = (
    "the script's defaults (learning rate 1e-3 among them) were chosen by looking at this embedded demo data set "
    "(README), so the guarantee covers this training run, not that choice of settings."
)

#: Warn above this sigma / B. The embedded demo at epsilon 10 runs at 0.005 (sigma 1.27, B 256); at epsilon 0.01 it
#: reaches 20 (sigma 5,120) and its samples do not move from the public model's.
NOISE_TO_SIGNAL_WARNING = 0.1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: argparse's "(default: X)" unless the help already says what the default is, or
    the flag is a switch or has no value by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


#: Library parameters whose flag here has another name (errors name parameters; see dp_diffusers.errors.cli_message).
RENAMED_PARAMETERS = {
    "target_epsilon": "--epsilon",
    "expected_batch_size": "--train_batch_size",
    "epochs": "--num_train_epochs",
    "max_steps": "--max_train_steps",
    "scope": "--trainable_scope",
    "split": "--dataset_split",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Public base pipeline (folder or Hub id): DPLDMPipeline, StableDiffusionPipeline, DiTPipeline or "
        "LDMPipeline. Default: the --dataset_name preset's recommended public base (one that never saw that data), "
        "else the shipped digit model (dp_diffusers.DEFAULT_PUBLIC_MODEL).",
    )
    g.add_argument(
        "--dataset_name",
        default="digits",
        help=f"Private data: a preset ({', '.join(PRESETS)}), a Hub id, a local folder or parquet file.",
    )
    g.add_argument("--train_data_dir", default=None, help="Local folder of private images (alias of --dataset_name).")
    g.add_argument("--dataset_split", default="train", help="Split of the private data set to train on.")
    g.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on the first N examples only (debugging, quick trials); N is public, like the data set size.",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Train and sample at this image size (private images are cropped to a square and resized to it), "
        "e.g. Stable Diffusion at 256 instead of 512 to save compute. Default: the base model's own size.",
    )
    g.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop non-square images to their center square. Without it the square is placed at random along the "
        "longer side, drawn once per image from --seed (diffusers redraws it every epoch; here the latents are "
        "encoded once, so each image keeps one crop).",
    )
    g.add_argument(
        "--random_flip",
        action="store_true",
        help="Mirror each image left-right with probability 1/2 every time it is drawn (both ways are encoded "
        "once: twice the encoding time and cache size).",
    )
    g.add_argument(
        "--latent_cache_dir",
        default=None,
        help="Where the private latents are cached (memory-mapped Arrow, reused by resumed and repeated runs). "
        "They are private data: never uploaded. Default: latent_cache/ in --output_dir.",
    )
    g.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="Leave out images that cannot be decoded (corrupt, truncated), with their count; without it they stop "
        "the run with a one-line error.",
    )
    g.add_argument("--revision", default=None, help="Revision (branch, tag or commit) of a Hub base model.")
    g.add_argument("--variant", default=None, help="Weights variant of the base model, e.g. fp16 files.")
    g.add_argument("--cache_dir", default=None, help="Where Hub models and data sets are cached (default: HF's).")
    g.add_argument("--image_column", default=None, help="Image column (default: the preset's, or 'image').")
    g.add_argument("--label_column", default=None, help="Label column (default: the preset's, or 'label').")
    g.add_argument(
        "--class_names",
        default=None,
        help="The label set, as public input: 'ant,bee,cat' or a file with one name per line (integer labels are "
        "indices into it). Needed when the label column is not a datasets ClassLabel: a label set read from the "
        "private labels would leak which classes occur.",
    )
    g.add_argument("--output_dir", default="dp-ldm-output", help="Where the private pipeline is written.")
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Train into an output folder that holds a finished run or another run's checkpoints (they are "
        "removed first). A second release from the same private data adds to the privacy cost; the card says so.",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the loss-side randomness (initialisation, timesteps, diffusion noise, label dropout) and the "
        "sample grids. The DP noise and the Poisson sampling never use it: they come from the OS's entropy.",
    )

    g = p.add_argument_group("what trains (everything else is frozen)")
    g.add_argument(
        "--trainable_scope",
        default=None,
        choices=list(SCOPES),
        help="attention_blocks: whole attention blocks (the paper); attention_projections: only their "
        "q/k/v/out projections (the default, and the only choice, with --use_lora); attention_up_resnets: the "
        "attention blocks plus the ResNet blocks of the UNet's up (decoder) path; full: every parameter of the "
        "denoiser. Default: what the base's pretraining.json recommends (fine_tune_defaults: attention_up_resnets "
        "for the domain-general prior, dp_diffusers.GENERAL_PUBLIC_MODEL, which must move further), else "
        "attention_blocks.",
    )
    g.add_argument(
        "--attention_layers",
        default=None,
        help="Attention blocks to train in the paper's 1..L forward numbering, e.g. '3-7'. Default: all.",
    )
    g.add_argument(
        "--target_modules",
        nargs="+",
        default=None,
        help="peft-style: one regex (full match) or several module-name suffixes. Chooses the modules by itself "
        "(not with --trainable_scope or --attention_layers).",
    )
    g.add_argument("--freeze_embedder", action="store_true", help="Do not train the class embedder.")
    g.add_argument(
        "--use_lora",
        action="store_true",
        help="Train LoRA adapters on the selected linear layers (by default the attention blocks' "
        "to_q/to_k/to_v/to_out.0; the embedder trains fully) instead of their weights.",
    )
    g.add_argument(
        "--rank",
        "--lora_rank",
        dest="lora_rank",
        metavar="RANK",
        type=int,
        default=None,
        help=f"LoRA rank r (with --use_lora). Default: {DEFAULT_LORA_RANK}.",
    )
    g.add_argument(
        "--lora_alpha",
        type=float,
        default=None,
        help="LoRA alpha (scale alpha / r; with --use_lora). Default: the rank.",
    )

    g = p.add_argument_group("model family options")
    g.add_argument(
        "--label_map",
        default=None,
        help="DiT: private label id -> the model's class id, e.g. '0:207,1:360' (each private class starts from "
        "that class's embedding). Default: new rows at ids 0..n-1, initialised to the mean class embedding.",
    )
    g.add_argument("--caption_column", default=None, help="Stable Diffusion: each image's prompt from this column.")
    g.add_argument(
        "--prompt_template",
        default=None,
        help=f"Stable Diffusion: prompts from the label names (default: {DEFAULT_PROMPT_TEMPLATE!r}).",
    )
    g.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Stable Diffusion: also train the CLIP text encoder (as the embedder; its position embedding stays "
        "frozen).",
    )

    g = p.add_argument_group("privacy (DP-SGD through Opacus)")
    g.add_argument("--epsilon", type=float, default=10.0, help="Privacy budget; never exceeded.")
    g.add_argument("--delta", type=float, default=None, help="Default: largest power of 10 <= 1/(10 N), at most 1e-5.")
    g.add_argument(
        "--noise_multiplier",
        type=float,
        default=None,
        help="Set sigma directly instead of calibrating it to --epsilon over the planned steps.",
    )
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=1e-3,
        help="The per-example clipping bound C (Opacus' name for it): each example's gradient over all trained "
        "parameters is scaled to norm at most C before noise. Tiny values clip every gradient (normalised DP-SGD), "
        "as the paper's configs do.",
    )
    g.add_argument(
        "--accountant",
        default="prv",
        choices=["prv", "rdp", "gdp"],
        help="Opacus accountant that turns sigma, q and steps into epsilon: prv (the tightest), rdp, or gdp "
        "(experimental).",
    )
    g.add_argument(
        "--grad_sample_mode",
        default="bookkeeping",
        choices=list(GRAD_SAMPLE_MODES),
        help="Per-example clipping. bookkeeping (default): Opacus' hooks, but linear weights that see few positions "
        "(cross-attention on class tokens, coarse feature maps) are clipped from ghost norms without per-sample "
        "gradient tensors: same result, least memory. hooks: Opacus' per-sample gradients for every layer. "
        "functorch: torch.func. ghost: Opacus' two-pass ghost clipping.",
    )
    g.add_argument(
        "--noise_multiplicity",
        type=int,
        default=1,
        help="K noise draws per example, averaged before clipping (DPDM); privacy cost unchanged.",
    )
    g.add_argument("--disable_dp", action="store_true", help="NON-PRIVATE baseline: no clipping, no noise.")
    g.add_argument(
        "--plan",
        action="store_true",
        help="Dry run: print sigma, q, steps, epochs, noise-to-signal, epsilon and the estimated time for these flags "
        "(timed on random images), then exit. Reads the private data's size N only; writes nothing.",
    )
    g.add_argument(
        "--insecure_reproducible_noise",
        action="store_true",
        help="Debugging only: draw the DP noise and the Poisson sampling from --seed, so that the run can be "
        "replayed. Anyone who knows the seed can replay it too: NOT a valid DP release (the card says so, and "
        "--push_to_hub refuses it without --allow_non_private_push).",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=256, help="Logical (expected) batch size, in examples.")
    g.add_argument(
        "--max_physical_batch_size",
        type=int,
        default=None,
        help="Most examples per forward/backward (memory); default: the logical batch.",
    )
    g.add_argument(
        "--num_train_epochs",
        type=float,
        default=None,
        help="Planned epochs (sets the noise for --epsilon). Default 30; with --noise_multiplier and "
        "--epsilon and no plan, training runs until the budget is spent.",
    )
    g.add_argument("--max_train_steps", type=int, default=None, help="Planned logical steps; overrides epochs.")
    g.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="AdamW learning rate of the trained weights. Default: what the base's pretraining.json recommends "
        "(fine_tune_defaults: 3e-3 for the domain-general prior, dp_diffusers.GENERAL_PUBLIC_MODEL, far from any "
        "private data), else 1e-3.",
    )
    g.add_argument("--lr_scheduler", default="constant", help="diffusers' get_scheduler name, over logical steps.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning-rate schedule.")
    g.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    g.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Save an EMA of the trained weights (post-processing: free for privacy). On by default; --no-use_ema "
        "saves the last weights.",
    )
    g.add_argument("--ema_decay", type=float, default=0.999, help="Decay of the EMA (with --use_ema). 0: off.")
    g.add_argument(
        "--cond_drop_prob",
        type=float,
        default=0.1,
        help="Per-example label dropout to the null class (keeps classifier-free guidance working).",
    )

    g = p.add_argument_group("checkpoints, logging, outputs")
    g.add_argument("--checkpointing_steps", type=int, default=100, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    g.add_argument(
        "--validation_steps", type=int, default=0, help="Also write a sample grid every N steps (0: never)."
    )
    g.add_argument(
        "--validation_epochs", type=int, default=0, help="Also write a sample grid every N epochs (0: never)."
    )
    g.add_argument(
        "--num_validation_images",
        type=int,
        default=40,
        help="Images in each sample grid, in total, spread evenly over its rows (one per class).",
    )
    g.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of the grids.")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance of the grids (free for privacy). Default: the family's, 2.0 for the shipped "
        "class-conditional LDMs (class fidelity: measured in the README), 7.5 for Stable Diffusion; DiT grids and "
        "unconditional ones sample without guidance.",
    )
    g.add_argument(
        "--report_to",
        default="tensorboard",
        help="Accelerate tracker: tensorboard, wandb, all or none (a missing tracker is reported, not silent).",
    )
    g.add_argument("--tracker_project_name", default="dp-ldm", help="Project name given to the tracker.")
    g.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Worker processes of the training data loader."
    )
    g.add_argument("--logging_dir", default="logs", help="Tracker logs, under --output_dir (never pushed).")
    g.add_argument(
        "--log_private_loss",
        action="store_true",
        help="Also show and log the training loss. It is computed from private data without noise, so it is NOT "
        "covered by the guarantee: the card says so, and logs are never pushed. Default: steps, epsilon, speed.",
    )
    g.add_argument(
        "--mixed_precision",
        default="no",
        choices=["no", "bf16"],
        help="fp16 is refused: a GradScaler scales per-example gradients before clipping.",
    )
    g.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the release (pipeline, card, privacy.json, grid; never checkpoints or logs) to the Hub.",
    )
    g.add_argument(
        "--hub_model_id", default=None, help="Hub repository for --push_to_hub (default: the output's name)."
    )
    g.add_argument("--hub_token", default=None, help="Never logged or saved; prefer `hf auth login`.")
    g.add_argument(
        "--allow_non_private_push",
        action="store_true",
        help="Allow pushing a model that is not a valid DP release (--disable_dp, --insecure_reproducible_noise).",
    )
    g.add_argument(
        "--release_cpu_memory",
        action="store_true",
        help="On CPU, let glibc return freed memory to the OS (slower DP steps: see dp_diffusers/runtime.py).",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.train_data_dir:
        args.dataset_name = args.train_data_dir
    args.pretrained_model_name_or_path, recommended = resolve_base_model(
        args.pretrained_model_name_or_path, args.dataset_name
    )
    args.recommended_base = recommended  # why the preset's base was chosen, for error messages (not saved)
    chooses_modules = args.attention_layers or args.target_modules or args.use_lora
    if args.learning_rate is None or (args.trainable_scope is None and not chooses_modules):
        # What trains and how fast from this base: its pretraining.json's recommendation, else the paper's.
        defaults = fine_tune_defaults(args.pretrained_model_name_or_path)
        if args.learning_rate is None:
            args.learning_rate = defaults.learning_rate
        if args.trainable_scope is None and not chooses_modules:
            args.trainable_scope = defaults.trainable_scope
    if recommended is not None and recommended.label_map and args.label_map is None:
        args.label_map = recommended.label_map  # the preset's documented mapping onto the base's classes
    until_budget = args.noise_multiplier is not None and args.epsilon is not None and not args.disable_dp
    if args.num_train_epochs is None and args.max_train_steps is None and not until_budget:
        args.num_train_epochs = 30.0
    if args.num_inference_steps < 1:
        p.error("--num_inference_steps must be >= 1")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:  # also refuses NaN
        p.error(f"--guidance_scale must be >= 0 (1.0 or less: no guidance), got {args.guidance_scale}")
    if args.push_to_hub and args.disable_dp and not args.allow_non_private_push:
        p.error("--push_to_hub refuses a NON-PRIVATE model (--disable_dp); add --allow_non_private_push to insist.")
    if args.push_to_hub and args.insecure_reproducible_noise and not args.allow_non_private_push:
        p.error(
            "--push_to_hub refuses a model whose noise is reproducible from the seed (--insecure_reproducible_noise): "
            "it is NOT a valid DP release; add --allow_non_private_push to insist."
        )
    if args.mixed_precision == "bf16" and args.grad_sample_mode == "ghost" and not args.disable_dp:
        # Opacus' ghost clipping computes per-example norms in bf16 under autocast: clipped gradients then exceed
        # C by up to ~1% (measured), which the accountant does not allow for. The other modes clip in float32.
        p.error(
            "--grad_sample_mode ghost computes its norms in bf16 under --mixed_precision bf16, which breaks the "
            "clip bound: use --grad_sample_mode bookkeeping (the default) or hooks."
        )
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        p.error("--overwrite_output_dir starts over and --resume_from_checkpoint continues: give one of them.")
    try:
        _trainable_config(args)  # conflicting choices of what trains: refused before any work
    except UserInputError as e:
        p.error(cli_message(e, parser_flags(p, **RENAMED_PARAMETERS)))
    return args


def public_args(args: argparse.Namespace) -> dict:
    """The arguments as saved and logged: without the Hub token."""
    return {k: v for k, v in vars(args).items() if k not in ("hub_token", "recommended_base")}


def main(args: argparse.Namespace) -> None:
    # ---------------------------------------------------------------- accelerator, logging
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    missing_tracker = None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to, missing_tracker = None, "tensorboard"
    accelerator = Accelerator(
        cpu=multi_process_cpu(),  # a multi-process launch without a GPU: one main process (dp_diffusers.runtime)
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO, force=True)
    if missing_tracker:
        logger.warning(
            f"--report_to={missing_tracker}: {missing_tracker} is not installed, so nothing goes to a tracker "
            f"(`pip install {missing_tracker}`, or --report_to=none to silence this)."
        )
    set_seed(args.seed)
    if accelerator.device.type == "cpu" and not args.release_cpu_memory and retain_freed_memory():
        logger.info("CPU: glibc keeps freed memory for reuse (per-sample gradients are re-allocated every batch).")
    if args.disable_dp:
        logger.warning(
            "=" * 30 + " NOT DIFFERENTIALLY PRIVATE: --disable_dp trains a non-private baseline " + "=" * 30
        )
    elif args.insecure_reproducible_noise:
        logger.warning(
            "=" * 20 + " NOT A VALID DP RELEASE: --insecure_reproducible_noise draws the DP noise and the sampling "
            "from --seed; anyone who knows it can replay the run " + "=" * 20
        )
    previous_release = None if args.plan else claim_output_dir(output_dir, args, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- public model family
    check_base_model(args.pretrained_model_name_or_path, args.dataset_name)  # refuses a base that saw this data
    options = FamilyOptions(
        label_map=parse_label_map(args.label_map),
        caption_column=args.caption_column,
        prompt_template=args.prompt_template,
        train_text_encoder=args.train_text_encoder,
    )
    try:
        family = load_family(
            args.pretrained_model_name_or_path,
            options=options,
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        ).to(accelerator.device)
    except UserInputError as e:
        if args.recommended_base is None or "from the Hub" not in str(e):
            raise
        base = args.pretrained_model_name_or_path
        raise UserInputError(
            f"--dataset_name={args.dataset_name} starts from the public base {base} ({args.recommended_base.reason}), "
            f"which is not on this machine and could not be fetched {str(e).split('from the Hub', 1)[-1].strip()} "
            "Download it where "
            f"there is network (`hf download {base} --local-dir <folder>`), then pass "
            "--pretrained_model_name_or_path=<folder>."
        ) from e

    if args.resolution is not None:
        family.set_resolution(args.resolution)

    # ---------------------------------------------------------------- private data, encoded once by the frozen VAE
    loaded = load_image_dataset(
        args.dataset_name,
        split=args.dataset_split,
        image_column=args.image_column,
        label_column=args.label_column,
        class_names=parse_class_names(args.class_names),
        cache_dir=args.cache_dir,
    )
    if args.max_train_samples is not None:
        if args.max_train_samples < 1:
            raise UserInputError(f"--max_train_samples must be >= 1, got {args.max_train_samples}.")
        # The first N rows, whatever they hold: which examples train must not depend on their content.
        loaded.dataset = loaded.dataset.select(range(min(args.max_train_samples, len(loaded.dataset))))
    if args.plan:
        plan(args, family, loaded, accelerator.device)
        return
    loaded, skipped = drop_unreadable_images(loaded, skip_bad_images=args.skip_bad_images)
    if skipped:
        logger.warning(f"--skip_bad_images: left out {skipped} image(s) that cannot be decoded.")
    if family.needs_labels and loaded.label_column is None:
        raise no_labels_error(loaded.source)
    mapping = family.prepare(loaded)  # captions, the declared label set
    logger.info(
        f"Private data: {loaded.source}, {len(loaded.dataset)} images, converted to {family.channels}x"
        f"{family.resolution}x{family.resolution} (the base model's input)"
        + (
            f"; label set ({len(loaded.id2label)} classes, public) from {loaded.label_set_source}"
            if loaded.id2label
            else ""
        )
    )
    if mapping:
        logger.info(mapping)
    encoded, latent_cache = _encode_private(args, family, loaded, accelerator, output_dir)

    # ---------------------------------------------------------------- trainable parameters (the rest is frozen)
    report = _select_trainable(args, family)
    logger.info(f"{report} ({len(report.modules)} modules), learning rate {args.learning_rate:g}")
    model = family.loss_module(cond_drop_prob=args.cond_drop_prob).to(accelerator.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    # ---------------------------------------------------------------- privacy engine (Opacus)
    engine = DPEngine(config=_privacy_config(args), dataset_size=len(encoded))
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=engine.planned_steps or 10**9,
    )
    ema = EMAModel(params, decay=args.ema_decay) if args.use_ema and args.ema_decay > 0 else None

    # ---------------------------------------------------------------- resume: weights, optimizer, EMA, RNG, accountant
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info(f"No checkpoint under {output_dir}: starting a new run.")
    earlier_seconds = 0.0  # DP-step wall-clock of the runs this one resumes (None: a checkpoint that lacks it)
    if checkpoint is not None:
        earlier_seconds = _resume(
            checkpoint, names, params, ema, engine, optimizer, lr_scheduler, rank=accelerator.process_index
        )
        logger.info(f"Resumed {checkpoint} at step {engine.steps}, epsilon {engine.epsilon}")

    loader = torch.utils.data.DataLoader(
        encoded, batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers
    )
    model_dp, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        # None: the noise and the Poisson masks come from OS entropy (dp_diffusers/privacy/randomness.py).
        seed=args.seed * 1_000_003 + engine.steps if args.insecure_reproducible_noise else None,
    )
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=_scalars(public_args(args)))
        (output_dir / "validation").mkdir(parents=True, exist_ok=True)
        if engine.steps == 0:
            _grid(family, args).save(output_dir / "validation" / "step_000000_public_base.png")
    sigma = engine.noise_multiplier
    logger.info(
        f"{'NON-PRIVATE' if args.disable_dp else 'DP-SGD'}: N={engine.dataset_size}, q={engine.sample_rate:.5g},"
        f" planned steps {engine.planned_steps}, sigma={sigma}, C={args.max_grad_norm}, K={args.noise_multiplicity}"
        f", world size {accelerator.num_processes}"
        + ("" if sigma is None else f", noise-to-signal per step sigma/B = {engine.noise_to_signal:.3g}")
    )
    if engine.private and engine.noise_to_signal > NOISE_TO_SIGNAL_WARNING:
        logger.warning(
            f"Noise-to-signal sigma/B = {engine.noise_to_signal:.3g}: each step's noise is more than "
            f"{NOISE_TO_SIGNAL_WARNING:g} C on an average gradient of norm at most C, so training can hardly move the "
            "model. Use a larger --train_batch_size, fewer steps (--num_train_epochs / --max_train_steps) or a "
            "larger --epsilon."
        )

    # ---------------------------------------------------------------- training loop (logical steps)
    started = time.time()
    epoch_steps = steps_per_epoch(sample_rate=engine.sample_rate)  # the Poisson loader's steps per pass
    bar = tqdm(
        total=engine.planned_steps,
        initial=engine.steps,
        desc="DP fine-tuning" if engine.private else "NON-PRIVATE fine-tuning",
        disable=not accelerator.is_local_main_process,
    )
    running = None
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            if engine.batch_is_empty:  # an empty Poisson draw: the step adds noise only, and counts
                loss = None
            else:
                rows = repeat_rows([t.to(accelerator.device) for t in batch], args.noise_multiplicity)
                with accelerator.autocast():
                    loss = model_dp(*rows)
            engine.backward(loss)
            if not engine.step():
                continue
            lr_scheduler.step()
            # Post-processing of the released (noised) weights, so free for privacy; a NaN *loss* is not looked at.
            # One host sync per step, not one per tensor (a norm would overflow on huge but finite weights).
            if not torch.stack([torch.isfinite(p).all() for p in params]).all():
                bar.close()  # the error line then starts on a line of its own
                raise UserInputError(
                    f"Step {engine.steps}: the trained weights became NaN or inf; nothing was written beyond the last "
                    "checkpoint. Lower --learning_rate (or use --lr_warmup_steps), or train in fp32 "
                    "(--mixed_precision no)."
                )
            if ema is not None:
                ema.step(params)
            if args.log_private_loss and loss is not None and loss.numel():  # NOT covered by the DP guarantee
                running = loss.mean().item() if running is None else 0.9 * running + 0.1 * loss.mean().item()
            bar.update(1)
            step = engine.steps
            if step % 10 == 0 or engine.finished:
                eps = engine.epsilon
                shown = {"eps": "n/a" if eps is None else format_epsilon(eps, digits=4)}
                logged = {"epsilon": eps, "lr": lr_scheduler.get_last_lr()[0]}
                if args.log_private_loss:
                    shown["loss"] = f"{running:.4f}" if running else "-"
                    logged["private_loss_not_dp"] = running
                bar.set_postfix(shown)
                accelerator.log(logged, step=step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                so_far = None if earlier_seconds is None else earlier_seconds + time.time() - started
                _checkpoint(
                    output_dir / f"checkpoint-{step}", names, params, ema, engine, optimizer, lr_scheduler, so_far
                )
                prune_checkpoints(output_dir, keep=args.checkpoints_total_limit)
            every = args.validation_steps or args.validation_epochs * epoch_steps
            if every and step % every == 0 and accelerator.is_main_process:
                _grid(family, args).save(output_dir / "validation" / f"step_{step:06d}.png")
        if engine.steps == 0 and engine.finished:
            break
    bar.close()
    seconds = time.time() - started
    if (engine.planned_steps is None or engine.steps < engine.planned_steps) and engine.budget_exhausted:
        planned = f" of {engine.planned_steps}" if engine.planned_steps else ""
        logger.warning(f"Stopped after {engine.steps}{planned} steps: one more would exceed epsilon={args.epsilon}.")

    # ---------------------------------------------------------------- outputs (main process, atomic)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.end_training()
        return
    if ema is not None:
        ema.copy_to(params)  # the saved model uses the EMA weights
    summary = engine.summary()
    summary.update(
        trainable_parameters=report.trainable,
        total_parameters=report.total,
        trained_modules=report.modules,
        trainable_fraction=report.fraction,
        base_model=str(args.pretrained_model_name_or_path),
        private_data=loaded.source,
        unit_of_privacy="one training image",
        ema_decay=args.ema_decay if ema is not None else 0,
        trained_parameters_kind=_trained_kind(_trainable_config(args))
        + (" + the embedder (full)" if "embedder" in report.modules else ""),
        base_model_pretraining_data=family.base_data(),
        **family.describe(),
        dp_ldm_version=dp_diffusers.__version__,
        # Wall-clock of the DP steps that made this model, over every resumed run (the time of steps lost to an
        # interruption after the last checkpoint is not counted); None where an old checkpoint did not record it.
        train_seconds=None if earlier_seconds is None else round(earlier_seconds + seconds, 1),
        train_seconds_this_run=round(seconds, 1),
        label_set=None
        if not loaded.id2label
        else {
            "classes": len(loaded.id2label),
            "declared_by": loaded.label_set_source,
            "treated_as": "public (declared, never read from the private labels)",
        },
        private_loss_logged=bool(args.log_private_loss),
        previous_release=previous_release,
        private_latent_cache=_where(latent_cache, output_dir),
    )
    pipe = family.export_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with atomic_directory(output_dir / ".final") as tmp:
        if args.use_lora:
            summary["lora"] = save_pipeline_with_lora(pipe, tmp, family.denoiser)
        else:
            pipe.save_pretrained(tmp)
        _grid(family, args).save(tmp / "samples.png")
        grid_guidance = family.grid_guidance(args.guidance_scale)
        (tmp / "privacy.json").write_text(json.dumps(summary, indent=2))
        (tmp / "training_args.json").write_text(json.dumps(public_args(args), indent=2, default=str))
        private_model_card(
            privacy=summary,
            model_name=args.hub_model_id or output_dir.name,
            base_data=family.base_data(),
            private_data=loaded.source,
            repo_or_path=args.hub_model_id or str(output_dir),
            grid="samples.png",
            grid_note="Generated images only (never private data), one row per class: "
            f"DDIM {args.num_inference_steps} "
            f"steps, classifier-free guidance {grid_guidance:g}.",
            description=family.description,
            **({"tuning": DEMO_TUNING} if loaded.preset is not None and loaded.preset.name == "digits" else {}),
            usage=family.usage(
                args.hub_model_id or str(output_dir), lora=(summary.get("lora") or {}).get("format") == "diffusers"
            ),
        ).save(tmp / "README.md")
        released = sorted(item.name for item in tmp.iterdir())
    _publish(output_dir / ".final", output_dir)
    eps = summary["epsilon"]
    logger.info(
        f"Wrote {output_dir}: {engine.steps} steps in {seconds:.0f}s, "
        + ("NOT private" if eps is None else f"epsilon={format_epsilon(eps, digits=5)} at delta={summary['delta']:g}")
    )
    if args.push_to_hub:
        try:
            _push(args, output_dir, released)
        except Exception as e:  # the model is saved; the user needs the reason and the way to retry, not a trace
            first = first_line(e)
            include = " ".join(f'"{name}/*"' if (output_dir / name).is_dir() else f'"{name}"' for name in released)
            raise UserInputError(
                f"Push to the Hub failed ({first}); the model is saved in {output_dir}. Upload the release only "
                f"(never checkpoints or logs): `hf upload {args.hub_model_id or output_dir.name} {output_dir} "
                f"--include {include}`."
            ) from e
    accelerator.end_training()


#: What a finished run writes into its output folder besides the pipeline's component folders.
RELEASE_FILES = (
    "model_index.json",
    "privacy.json",
    "training_args.json",
    "README.md",
    "samples.png",
    "pytorch_lora_weights.safetensors",
    "dp_lora_adapter.safetensors",
)


def _encode_private(args, family, loaded, accelerator, output_dir: Path):
    """The private set encoded by the frozen encoders, through the latent cache (dp_diffusers/data/latent_cache.py):
    each process encodes its block of rows, then all read the whole cache, memory-mapped. Returns it and the cache
    root. The key (a hash that changes when one private example does) never reaches a log, the card or privacy.json:
    only the root folder is named."""
    root = Path(args.latent_cache_dir) if args.latent_cache_dir else output_dir / "latent_cache"
    key = cache_key(
        # datasets' fingerprint of the loaded (and selected / filtered) data: changes with its files and any
        # transform. datasets has no public accessor for it.
        data=loaded.dataset._fingerprint,
        columns=[loaded.image_column, loaded.label_column],
        id2label=loaded.id2label,
        encoder=family.encoder_fingerprint(),
        resolution=family.resolution,
        channels=family.channels,
        crop="center" if args.center_crop else f"random from seed {args.seed}",
        random_flip=args.random_flip,
    )
    cache = LatentCache(root, key)
    if cache.complete:
        logger.info(f"Private latents: reusing the cache in {root}")
        return cache.load(), root
    images = as_torch_dataset(
        loaded,
        resolution=family.resolution,
        channels=family.channels,
        in_memory=False,  # decoded batch by batch while encoding: memory does not grow with N
        center_crop=args.center_crop,
        crop_seed=args.seed,
    )
    rank, world = accelerator.process_index, accelerator.num_processes

    def encode(rows, flipped: bool):
        return family.encode(
            images.flipped() if flipped else images, rows=rows, device=accelerator.device, progress=False
        )

    rows = cache.encode_shard(
        encode,
        num_rows=len(images),
        rank=rank,
        world_size=world,
        flip=args.random_flip,
        progress=accelerator.is_local_main_process,
    )
    logger.info(
        f"Private latents: process {rank} of {world} encoded rows {rows.start}..{rows.stop - 1}",
        main_process_only=False,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cache.finish(num_rows=len(images), world_size=world, flip=args.random_flip)
    accelerator.wait_for_everyone()
    logger.info(f"Private latents cached in {root} (private data: never uploaded; delete it when done)")
    return cache.load(), root


def _where(path: Path, output_dir: Path) -> str:
    """``path`` relative to the output folder when inside it (the card must not show where a user keeps files)."""
    try:
        return f"{path.resolve().relative_to(output_dir.resolve()).as_posix()}/ in the output folder"
    except ValueError:
        return "the folder given by --latent_cache_dir"


def claim_output_dir(output_dir: Path, args, *, is_main: bool) -> dict | None:
    """Refuses to train into a folder that holds a finished run (its ``privacy.json``: a second model from the same
    data would be a second release) or another run's checkpoints, unless ``--overwrite_output_dir``; then clears
    that run (main process) and returns what the earlier release spent, for the new card."""
    finished = (output_dir / "privacy.json").is_file()
    checkpoints = list_checkpoints(output_dir)
    if not args.overwrite_output_dir:
        if finished:
            raise UserInputError(
                f"{output_dir} holds a finished run (privacy.json): training into it again, or resuming it, would "
                "release a second model from the same private data. Choose a new --output_dir, or pass "
                "--overwrite_output_dir (the new card then says that the earlier release adds to the privacy cost)."
            )
        if checkpoints and not args.resume_from_checkpoint:
            raise UserInputError(
                f"{output_dir} holds checkpoints of another run ({checkpoints[-1].name}): continue it with "
                "--resume_from_checkpoint=latest, or start over with --overwrite_output_dir."
            )
        return None
    previous = None
    if finished:
        try:
            old = json.loads((output_dir / "privacy.json").read_text())
        except (OSError, ValueError):
            old = {}
        previous = {key: old.get(key) for key in ("epsilon", "delta", "steps", "private", "private_data")}
    if is_main:
        components = []
        try:
            components = [
                k for k in json.loads((output_dir / "model_index.json").read_text()) if not k.startswith("_")
            ]
        except (OSError, ValueError):
            pass
        for path in [*checkpoints, output_dir / ".final", output_dir / "validation", output_dir / args.logging_dir]:
            shutil.rmtree(path, ignore_errors=True)
        for name in components:
            if (output_dir / name).is_dir():
                shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in RELEASE_FILES:
            (output_dir / name).unlink(missing_ok=True)
        if finished or checkpoints:
            logger.warning(f"--overwrite_output_dir: removed the earlier run in {output_dir}.")
    return previous


def _trained_kind(config: TrainableConfig) -> str:
    """What the card says was trained (before the embedder)."""
    scope = config.resolved_scope
    where = "the modules matched by --target_modules" if scope is None else SCOPE_DESCRIPTIONS[scope]
    return f"LoRA adapters (rank {config.rank}) on {where}" if config.use_lora else f"full weights of {where}"


def _trainable_config(args) -> TrainableConfig:
    return TrainableConfig(
        scope=args.trainable_scope,
        attention_layers=args.attention_layers,
        target_modules=_target_modules(args.target_modules),
        train_embedder=not args.freeze_embedder,
        use_lora=args.use_lora,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
    )


def _select_trainable(args, family: ModelFamily):
    """Unfreezes what trains (selected modules or LoRA adapters on them, the embedder); returns the report."""
    return select_trainable(
        family.denoiser,
        config=_trainable_config(args),
        embedder=family.embedder,
        block_classes=family.attention_block_classes,
    )


def _privacy_config(args, **overrides) -> PrivacyConfig:
    settings = dict(
        target_epsilon=None if args.disable_dp else args.epsilon,
        delta=args.delta,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        accountant=args.accountant,
        grad_sample_mode=args.grad_sample_mode,
        noise_multiplicity=args.noise_multiplicity,
        expected_batch_size=args.train_batch_size,
        max_physical_batch_size=args.max_physical_batch_size,
        epochs=args.num_train_epochs,
        max_steps=args.max_train_steps,
        disable_dp=args.disable_dp,
    )
    return PrivacyConfig(**{**settings, **overrides})


def plan(args, family: ModelFamily, loaded, device) -> dict:
    """``--plan``: what these flags would do, from the data set's size N alone: no private image is decoded and no
    step runs on private data. The time per step is measured on random (public) images of the model's shape."""
    n = len(loaded.dataset)
    engine = DPEngine(config=_privacy_config(args), dataset_size=n)
    steps = engine.planned_steps
    family.adopt_labels(loaded.id2label)  # public names
    report = _select_trainable(args, family)
    per_step = _seconds_per_step(args, family, device, engine.noise_multiplier)
    private = engine.private and steps
    eps = (
        epsilon_after(
            [(engine.noise_multiplier, engine.sample_rate, steps)], accountant=args.accountant, delta=engine.delta
        )
        if private
        else None
    )
    facts = {
        "dataset_size": n,
        "sample_rate": engine.sample_rate,
        "expected_batch_size": args.train_batch_size,
        "planned_steps": steps,
        "epochs": None if steps is None else steps * args.train_batch_size / n,
        "noise_multiplier": engine.noise_multiplier,
        "noise_to_signal": engine.noise_to_signal,
        "epsilon_after_planned_steps": eps,
        "delta": engine.delta,
        "trainable_parameters": report.trainable,
        "seconds_per_step": per_step,
        "estimated_seconds": None if per_step is None or steps is None else per_step * steps,
    }
    for key, value in facts.items():
        shown = "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else f"{value:,}"
        if key.startswith("epsilon") and value is not None:
            shown = format_epsilon(value)  # rounded up
        print(f"{key:>28}: {shown}")
    if engine.private and engine.noise_to_signal > NOISE_TO_SIGNAL_WARNING:
        print(f"warning: noise-to-signal above {NOISE_TO_SIGNAL_WARNING:g}: training can hardly move the model.")
    return facts


def _seconds_per_step(args, family: ModelFamily, device, sigma: float | None) -> float | None:
    """Seconds of one logical step, from two timed steps on random images (public noise, not private data)."""
    p = min(args.max_physical_batch_size or args.train_batch_size, args.train_batch_size)
    shape = (family.channels, family.resolution, family.resolution)
    g = torch.Generator().manual_seed(0)
    fake = [{"pixel_values": torch.rand(shape, generator=g) * 2 - 1, "labels": torch.tensor(0)} for _ in range(p)]
    try:
        encoded = family.encode(fake, device=device, progress=False)
    except (RuntimeError, UserInputError):  # a family that needs more than images (Stable Diffusion's prompts)
        return None
    model = family.loss_module(cond_drop_prob=args.cond_drop_prob).to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    noise = {} if args.disable_dp else {"noise_multiplier": sigma, "target_epsilon": None}
    cfg = _privacy_config(args, expected_batch_size=p, max_physical_batch_size=p, epochs=None, max_steps=3, **noise)
    engine = DPEngine(config=cfg, dataset_size=p)  # q = 1: every step holds all p random examples
    loader = torch.utils.data.DataLoader(encoded, batch_size=p)
    module, _, loader = engine.make_private(
        module=model, optimizer=torch.optim.AdamW(params), data_loader=loader, seed=0
    )  # fmt: skip
    times = []
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            started = time.time()
            rows = repeat_rows([t.to(device) for t in batch], args.noise_multiplicity)
            engine.backward(module(*rows))
            engine.step()
            times.append(time.time() - started)
    return min(times[1:]) * args.train_batch_size / p


def _target_modules(values: list[str] | None) -> str | list[str] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 and any(c in values[0] for c in "*?[]()|\\^$") else values


def _scalars(d: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in d.items()}


def _grid(family: ModelFamily, args):
    """A sample grid of about ``--num_validation_images`` images in all, one row per class."""
    per_row = max(1, math.ceil(args.num_validation_images / family.grid_rows()))
    return family.sample_grid(
        per_class=per_row,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
    )


def _checkpoint(directory, names, params, ema, engine, optimizer, lr_scheduler, train_seconds) -> None:
    state = {
        "train_seconds": train_seconds,
        "engine": engine.state_dict(),
        "optimizer": optimizer.state_dict(),  # a DPOptimizer's is its wrapped optimizer's (Opacus)
        "lr_scheduler": lr_scheduler.state_dict(),
        "step": engine.steps,
        "ema_step": ema.optimization_step if ema is not None else 0,
    }
    ema_tensors = dict(zip(names, ema.shadow_params, strict=True)) if ema is not None else None
    save_checkpoint(
        directory,
        trained=dict(zip(names, params, strict=True)),
        state=state,
        ema=ema_tensors,
        rng_states=[rng_state()],
    )


def _resume(checkpoint, names, params, ema, engine, optimizer, lr_scheduler, *, rank: int) -> float | None:
    """What ``_checkpoint`` saved, put back: trained weights, engine (accountant), optimizer, schedule, EMA and the
    loss-side RNG. The DP noise and the Poisson masks draw fresh OS entropy on every (re)start: they are in no
    checkpoint. Returns the DP-step seconds spent up to the checkpoint (None if it did not record them)."""
    trained, ema_tensors, state = load_checkpoint(checkpoint)
    if sorted(trained) != sorted(names):
        raise UserInputError(
            f"{checkpoint} trained other parameters than this run selects: resume with the same "
            "--trainable_scope, --attention_layers, --target_modules, --freeze_embedder, --use_lora and "
            "--lora_rank."
        )
    engine.load_state_dict(state["engine"])  # refuses a different sigma, q, N or accountant
    with torch.no_grad():
        for n, p in zip(names, params, strict=True):
            p.copy_(trained[n])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None and ema_tensors is not None:
        ema.shadow_params = [ema_tensors[n].to(p.device) for n, p in zip(names, params, strict=True)]
        ema.optimization_step = int(state.get("ema_step", engine.steps))
    set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    seconds = state.get("train_seconds")
    return None if seconds is None else float(seconds)


def _publish(final: Path, output_dir: Path) -> None:
    """Moves the finished files into ``output_dir`` (beside checkpoints and logs), each by an atomic rename, with
    ``model_index.json`` (what makes a folder a loadable pipeline) removed first and put back last."""
    (output_dir / "model_index.json").unlink(missing_ok=True)
    for item in sorted(final.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    final.rmdir()


def _push(args, output_dir: Path, released: list[str]) -> None:
    """Uploads exactly the released files (the pipeline, card, privacy.json, grid): never checkpoints, logs or the
    validation grids of intermediate steps."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or output_dir.name
    repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        token=args.hub_token,
        commit_message="DP-LDM: private fine-tune (see privacy.json)",
        allow_patterns=[f"{name}/**" if (output_dir / name).is_dir() else name for name in released],
    )
    logger.info(f"Pushed to https://huggingface.co/{repo_id}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserInputError as e:
        print(f"error: {cli_message(e, parser_flags(build_parser(), **RENAMED_PARAMETERS))}", file=sys.stderr)
        sys.exit(2)
