"""The privacy audit (``dp_diffusers/audit.py``, ``examples/audit.py``): bounds on synthetic scores, a Gaussian
mechanism of known epsilon, the white-box path through the DP engine on a tiny model (a test of the engine itself:
power without noise, the clipped canary's size, the noise scale, and a bound below the accounted epsilon), the
black-box path through ``train_dp_ldm.py`` end to end, and the one-line error when the ``[audit]`` extra is missing.
"""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dp_diffusers import UserInputError
from dp_diffusers.audit import (
    BlackBoxConfig,
    WhiteBoxConfig,
    audit_bounds,
    draw_inclusion,
    run_black_box,
    run_white_box,
    train_argv,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "audit.py"
DIGIT_NAMES = [str(i) for i in range(10)]
JSON_KEYS = {
    "name",
    "setting",
    "disable_dp",
    "epsilon_accounted",
    "epsilon_lower_bound",
    "epsilon_one_run",
    "epsilon_one_run_fdp",
    "auc",
    "m",
    "confidence",
    "command",
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a 2-core machine shared with another job two threads
    thrash (a tiny white-box run: 13 s with one thread, over 60 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.models.configs import TINY, build_class_conditional_ldm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-base") / "model"
    DPLDMPipeline(**build_class_conditional_ldm(TINY, id2label=dict(enumerate(DIGIT_NAMES)))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """The first 400 embedded digits as parquet (a ClassLabel column): a smaller private set keeps tests fast."""
    from dp_diffusers.data import load_sklearn_digits

    path = tmp_path_factory.mktemp("digits") / "train.parquet"
    load_sklearn_digits().select(range(400)).to_parquet(str(path))
    return path


# ---------------------------------------------------------------------------------------------------- bounds


def test_well_separated_scores_give_a_clearly_positive_bound():
    rng = np.random.default_rng(0)
    bounds = audit_bounds(
        in_scores=rng.normal(6.0, 1.0, 500), out_scores=rng.normal(0.0, 1.0, 500), delta=1e-5, confidence=0.95
    )
    assert bounds["auc"] > 0.99
    assert bounds["epsilon_one_run"] > 2.0 and bounds["epsilon_one_run_fdp"] > 2.0
    assert bounds["epsilon_lower_bound"] == max(bounds["epsilon_one_run"], bounds["epsilon_one_run_fdp"])
    assert bounds["m"] == 1000 and bounds["m_included"] == 500


def test_identical_distributions_give_zero():
    rng = np.random.default_rng(1)
    scores = rng.normal(0.0, 1.0, 1000)
    bounds = audit_bounds(in_scores=scores[:500], out_scores=scores[500:], delta=1e-5)
    assert bounds["epsilon_lower_bound"] < 0.05
    assert abs(bounds["auc"] - 0.5) < 0.06


def test_reversed_scores_give_zero_not_a_bound():
    """Scores must be "higher = member": an attack that ranks members lowest proves nothing (one-sided)."""
    rng = np.random.default_rng(2)
    bounds = audit_bounds(in_scores=rng.normal(-6, 1, 300), out_scores=rng.normal(0, 1, 300), delta=1e-5)
    assert bounds["epsilon_lower_bound"] == 0.0 and bounds["auc"] == 0.5  # jax_privacy: at worst a coin flip


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon(delta) of the Gaussian mechanism with sensitivity / sigma = mu (Balle and Wang 2018)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("mu", [0.5, 2.0, 4.0])
def test_gaussian_mechanism_bound_stays_below_its_true_epsilon(mu):
    """Each canary's score is one release of a Gaussian mechanism (shift mu when included): the audit's bound at 95%
    must stay below the mechanism's true epsilon, and for large mu be clearly positive."""
    rng = np.random.default_rng(3)
    included = draw_inclusion(4000, generator=rng)
    scores = mu * included + rng.normal(0.0, 1.0, included.size)
    true_epsilon = gaussian_dp_epsilon(mu, 1e-5)
    bounds = audit_bounds(in_scores=scores[included], out_scores=scores[~included], delta=1e-5)
    assert bounds["epsilon_lower_bound"] < true_epsilon
    if mu >= 2:
        assert bounds["epsilon_lower_bound"] > 0.25 * true_epsilon


def test_inclusion_draw_uses_fresh_entropy():
    a, b = draw_inclusion(2000), draw_inclusion(2000)
    assert a.dtype == bool and 850 < a.sum() < 1150
    assert not np.array_equal(a, b)  # OS entropy: two draws agree with probability 2^-2000


# ---------------------------------------------------------------------------------------------------- white-box


def white_box(tiny_base, data, out, **overrides):
    settings = dict(
        num_canaries=400,
        pretrained_model_name_or_path=str(tiny_base),
        dataset_name=str(data),
        train_batch_size=40,
        num_train_epochs=None,
        max_train_steps=15,
    )
    settings.update(overrides)
    return run_white_box(config=WhiteBoxConfig(**settings), output_dir=out, progress=False)


def test_white_box_without_noise_or_clipping_has_power(tiny_base, small_digits, tmp_path):
    result = white_box(tiny_base, small_digits, tmp_path / "a", disable_dp=True)
    assert result.epsilon_accounted is None and result.disable_dp
    assert result.epsilon_lower_bound >= 1.0, result
    d = result.details
    # Every canary joins with the real examples' sample rate, once per logical step.
    assert d["canary_steps_seen"] == d["steps"] == 15
    assert d["joins_per_included_canary_mean"] == pytest.approx(d["sample_rate"] * 15, rel=0.25)
    # Unclipped and unnoised, an included canary moves its coordinate by one canary step per join.
    scores = np.load(tmp_path / "a" / "scores.npz")
    gap = d["score_in_mean"] - d["score_out_mean"]
    assert gap == pytest.approx(scores["counts"][scores["included"]].mean(), abs=0.15)
    assert json.loads((tmp_path / "a" / "audit.json").read_text()).keys() >= JSON_KEYS


def test_white_box_clipping_caps_the_canary_at_the_clip_norm(tiny_base, small_digits, tmp_path):
    """No noise, clipping on: a canary of norm 2C moves its coordinate by C per join, not 2C (a missed clip would
    double the in/out gap); the real data, clipped to C too, barely moves a single coordinate."""
    result = white_box(tiny_base, small_digits, tmp_path / "c", noise_multiplier=0.0)
    d = result.details
    assert d["canary_norm"] == pytest.approx(2e-3) and d["clipped_canary_norm"] == pytest.approx(1e-3, rel=1e-3)
    scores = np.load(tmp_path / "c" / "scores.npz")
    joins = scores["counts"][scores["included"]].mean()
    assert d["score_in_mean"] - d["score_out_mean"] == pytest.approx(joins, abs=0.25)
    assert result.epsilon_lower_bound >= 1.0 and result.epsilon_accounted is None


def test_white_box_with_the_engines_noise_stays_below_the_accounted_epsilon(tiny_base, small_digits, tmp_path):
    result = white_box(tiny_base, small_digits, tmp_path / "n", epsilon=1.0)
    d = result.details
    assert result.epsilon_accounted == pytest.approx(1.0, rel=0.02)
    assert 0.0 <= result.epsilon_lower_bound < result.epsilon_accounted
    # The engine's noise, seen at the canaries' coordinates: std sigma C sqrt(T) in canary units, plus what the
    # clipped real gradients add there (small next to it at epsilon 1). Too little or too much noise shows here.
    assert 0.9 < d["residual_std"] / d["expected_noise_std"] < 1.15, d
    assert (tmp_path / "n" / "audit.md").read_text().count("below the accounted epsilon") == 1


def test_white_box_refuses_a_used_output_folder(tiny_base, small_digits, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "audit.json").write_text("{}")
    with pytest.raises(UserInputError, match="not empty"):
        white_box(tiny_base, small_digits, tmp_path / "used")


# ---------------------------------------------------------------------------------------------------- black-box


def test_black_box_end_to_end_through_train_dp_ldm(tiny_base, tmp_path):
    out = tmp_path / "bb"
    train = ["--train_batch_size", "64", "--max_physical_batch_size", "64", "--max_train_steps", "2"]
    train += ["--num_validation_images", "1", "--num_inference_steps", "2", "--checkpointing_steps", "0"]
    config = BlackBoxConfig(
        num_canaries=40,
        epsilon=10.0,
        pretrained_model_name_or_path=str(tiny_base),
        train_args=train,
        timesteps=(50, 300),
        noise_draws=1,
        command="python examples/audit.py black-box ...",
    )
    result = run_black_box(config=config, output_dir=out, progress=False)
    report = json.loads((out / "audit.json").read_text())
    assert report.keys() >= JSON_KEYS
    assert report["setting"] == "black-box" and report["m"] == 40 and report["confidence"] == 0.95
    assert report["command"] == "python examples/audit.py black-box ..."
    privacy = json.loads((out / "model" / "privacy.json").read_text())
    assert report["epsilon_accounted"] == privacy["epsilon"] and privacy["steps"] == 2
    assert 0.0 <= result.epsilon_lower_bound < privacy["epsilon"]
    # The private data is the digits plus exactly the included canaries, with a ClassLabel label column.
    import datasets

    data = datasets.load_dataset("parquet", data_files=str(out / "data" / "train.parquet"), split="train")
    assert isinstance(data.features["label"], datasets.ClassLabel)
    assert len(data) == 1797 + result.m_included == privacy["dataset_size"]
    scores = np.load(out / "scores.npz")
    assert scores["scores"].shape == (40,) and np.all(np.isfinite(scores["scores"]))
    assert (out / "audit.md").read_text().startswith("# Privacy audit")


def test_black_box_passes_class_names_only_when_the_script_knows_the_flag(tmp_path):
    class Knows:
        @staticmethod
        def parse_args(argv):
            if "--class_names" in argv:
                return argv
            raise SystemExit(2)

    config = BlackBoxConfig(num_canaries=10, epsilon=1.0)
    argv = train_argv(config, data=tmp_path / "d.parquet", model_dir=tmp_path / "m", script=Knows, class_names=["a"])
    assert argv[argv.index("--class_names") + 1] == "a" and argv[argv.index("--epsilon") + 1] == "1.0"

    class DoesNot:
        @staticmethod
        def parse_args(argv):
            raise SystemExit(2)

    argv = train_argv(config, data=tmp_path / "d", model_dir=tmp_path / "m", script=DoesNot, class_names=["a"])
    assert "--class_names" not in argv


# ---------------------------------------------------------------------------------------------------- the extra


def test_missing_audit_extra_is_a_one_line_error_naming_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "jax_privacy", None)
    monkeypatch.setitem(sys.modules, "jax_privacy.auditing", None)
    with pytest.raises(UserInputError) as info:
        audit_bounds(in_scores=[1.0, 2.0], out_scores=[0.0, 1.0], delta=1e-5)
    message = str(info.value)
    assert "\n" not in message and 'pip install -e ".[audit]"' in message and "dp-diffusers[audit]" in message


def test_example_prints_error_and_exits_2_without_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "jax_privacy", None)
    monkeypatch.setitem(sys.modules, "jax_privacy.auditing", None)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "white-box", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "[audit]" in err[0]
    assert not (tmp_path / "o").exists()  # failed before creating anything


def module_level_imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.parse(path.read_text()).body:  # top level only: imports inside functions are lazy
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_training_code_never_imports_jax_or_the_audit():
    """jax is imported lazily, inside the audit's functions; the privacy package does not know the audit."""
    audit_imports = module_level_imports(REPO / "dp_diffusers" / "audit.py")
    assert not any("jax" in name for name in audit_imports), audit_imports
    for source in [REPO / "train_dp_ldm.py", *(REPO / "dp_diffusers" / "privacy").glob("*.py")]:
        text = source.read_text()
        assert "audit" not in text and "jax" not in text, source
