#!/usr/bin/env python
"""Empirical privacy audit of DP-LDM training: a one-run canary audit (Steinke, Nasr and Jagielski 2023).

    python examples/audit.py white-box --epsilon 10 --num_canaries 5000 --output_dir audits/white-box-eps10
    python examples/audit.py white-box --disable_dp --output_dir audits/white-box-no-dp     # power check
    python examples/audit.py black-box --epsilon 10 --num_canaries 1000 --output_dir audits/black-box-eps10

White-box: crafted gradient canaries go through the DP engine's own clipping, noise and update (audits
``dp_diffusers.privacy.DPEngine``). Black-box: canary images are added to the private data and a model is trained by
``train_dp_ldm.py`` (audits the whole pipeline); arguments after ``--`` go to ``train_dp_ldm.py``. Each audit writes
``audit.json`` and ``audit.md`` (lower bounds on epsilon at 95% confidence, the accounted epsilon, the attack's ROC
AUC) into a new ``--output_dir``. Needs the ``[audit]`` extra: ``pip install -e ".[audit]"``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from dp_diffusers import UserInputError
from dp_diffusers.audit import BlackBoxConfig, WhiteBoxConfig, run_black_box, run_white_box
from dp_diffusers.errors import cli_message

#: This script's flags for the library parameters its errors may name (dp_diffusers.errors.cli_message).
FLAGS = {
    "num_canaries": "--num_canaries",
    "grad_sample_mode": "--grad_sample_mode",
    "target_epsilon": "--epsilon",
    "noise_multiplier": "--noise_multiplier",
    "max_grad_norm": "--max_grad_norm",
    "expected_batch_size": "--train_batch_size",
    "max_physical_batch_size": "--max_physical_batch_size",
    "epochs": "--num_train_epochs",
    "max_steps": "--max_train_steps",
    "disable_dp": "--disable_dp",
}


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = p.add_subparsers(dest="setting", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output_dir", required=True, help="A new (or empty) folder for this audit.")
    common.add_argument("--epsilon", type=float, default=10.0, help="The epsilon the run is trained to.")
    common.add_argument("--disable_dp", action="store_true", help="Power check: train without privacy.")
    common.add_argument("--confidence", type=float, default=0.95)
    common.add_argument("--pretrained_model_name_or_path", default=None, help="Default: the shipped public model.")
    common.add_argument("--name", default=None, help="A name for the report (default: from the settings).")

    w = sub.add_parser("white-box", parents=[common], help="Gradient canaries through the DP engine.")
    w.add_argument("--num_canaries", type=int, default=5000)
    w.add_argument("--noise_multiplier", type=float, default=None, help="Set sigma instead of --epsilon.")
    w.add_argument("--max_grad_norm", type=float, default=1e-3)
    w.add_argument("--canary_norm", type=float, default=None, help="Default: 2 C (1.0 with --disable_dp).")
    w.add_argument("--dataset_name", default="digits")
    w.add_argument("--train_batch_size", type=int, default=256)
    w.add_argument("--max_physical_batch_size", type=int, default=None)
    w.add_argument("--num_train_epochs", type=float, default=30.0)
    w.add_argument("--max_train_steps", type=int, default=None)
    w.add_argument("--learning_rate", type=float, default=1.0, help="Plain SGD.")
    w.add_argument(
        "--seed", type=int, default=0, help="Model-side seed; the DP noise, masks and canaries use OS entropy."
    )

    b = sub.add_parser("black-box", parents=[common], help="Canary images through train_dp_ldm.py.")
    b.add_argument("--num_canaries", type=int, default=1000)
    b.add_argument("--noise_draws", type=int, default=4, help="Noise draws per scoring timestep.")
    b.add_argument("--train_script", default=None, help="Default: the repository's train_dp_ldm.py.")
    args = p.parse_args(argv)
    args.train_args = train_args
    if train_args and args.setting != "black-box":
        p.error("arguments after -- go to train_dp_ldm.py and only apply to black-box audits")
    return args


def main(args: argparse.Namespace, *, command: str) -> None:
    common = dict(
        num_canaries=args.num_canaries,
        epsilon=args.epsilon,
        disable_dp=args.disable_dp,
        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        confidence=args.confidence,
        name=args.name,
        command=command,
    )
    if args.setting == "white-box":
        config = WhiteBoxConfig(
            **common,
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.max_grad_norm,
            canary_norm=args.canary_norm,
            dataset_name=args.dataset_name,
            train_batch_size=args.train_batch_size,
            max_physical_batch_size=args.max_physical_batch_size,
            num_train_epochs=None if args.max_train_steps else args.num_train_epochs,
            max_train_steps=args.max_train_steps,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )
        result = run_white_box(config=config, output_dir=args.output_dir)
    else:
        config = BlackBoxConfig(
            **common, train_args=args.train_args, noise_draws=args.noise_draws, train_script=args.train_script
        )
        result = run_black_box(config=config, output_dir=args.output_dir)
    claim = "not private" if result.epsilon_accounted is None else f"accounted epsilon {result.epsilon_accounted:.3f}"
    print(
        f"{result.name}: epsilon lower bound {result.epsilon_lower_bound:.3f} (one-run {result.epsilon_one_run:.3f}, "
        f"f-DP {result.epsilon_one_run_fdp:.3f}) at {result.confidence:g} confidence, {claim}, AUC {result.auc:.3f}, "
        f"m = {result.m}; wrote {args.output_dir}/audit.json"
    )


if __name__ == "__main__":
    try:
        main(parse_args(), command=shlex.join(["python", *sys.argv]))
    except UserInputError as e:
        print(f"error: {cli_message(e, FLAGS)}", file=sys.stderr)
        sys.exit(2)
