"""Model cards (``README.md``) for public and private pipelines, made with huggingface_hub's ``ModelCard``."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .privacy.accounting import format_epsilon
from .trainable import SCOPE_DESCRIPTIONS


def _base_model(path: str | None) -> tuple[str | None, str]:
    """``(Hub id for the card's metadata or None, how the card names it)``: a local folder is named by what it is,
    not by an absolute path on the machine that trained (privacy.json keeps the path)."""
    from pathlib import Path

    from . import DEFAULT_PUBLIC_MODEL

    if not path:
        return None, "unknown"
    if Path(path).resolve() == Path(DEFAULT_PUBLIC_MODEL).resolve():
        return None, f"`dp_diffusers.DEFAULT_PUBLIC_MODEL` (`{Path(path).name}`, shipped with dp-diffusers)"
    if Path(path).exists():
        return None, f"a local folder, `{Path(path).name}`"
    return path, f"[`{path}`](https://huggingface.co/{path})"


def _short(value, *, digits: int = 4) -> str:
    """A number for people (the card); ``privacy.json`` keeps full precision."""
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


PUBLIC_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A class-conditional latent diffusion model (`DPLDMPipeline` of
[dp-diffusers](https://github.com/dp-diffusers/dp-diffusers)): `AutoencoderKL` + `UNet2DConditionModel` whose
`Transformer2DModel` blocks cross-attend to a `ClassEmbedder`, DDIM sampling.

**Not differentially private, and it does not need to be:** it was trained on public data only:
{{ public_data }}.
It is a public starting point for private fine-tuning with `train_dp_ldm.py`, which trains only part of it with
DP-SGD. {{ fine_tune }}

## Training
{{ training }}

## Parameters
{{ parameters }}

## Usage
```python
from dp_diffusers import DPLDMPipeline

pipe = DPLDMPipeline.from_pretrained("{{ repo_or_path }}")
images = pipe(class_labels=list(range(10)), num_inference_steps=50).images
```

{% if grid %}![samples]({{ grid }}){% endif %}
"""


def public_model_card(
    *,
    model_name: str,
    public_data: str,
    training: str,
    parameters: dict[str, int],
    repo_or_path: str,
    datasets: list[str] | None = None,
    grid: str | None = None,
    fine_tune: dict | None = None,
) -> ModelCard:
    """The card of a model pre-trained on public data (``examples/pretrain_public_ldm.py``). ``fine_tune``: its
    pretraining.json's ``fine_tune_defaults`` (what ``train_dp_ldm.py`` trains from it unless told), if any."""
    data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "dp-ldm", "latent-diffusion", "class-conditional", "public-pretraining"],
        datasets=datasets,
        model_name=model_name,
    )
    params = "\n".join(f"- {k}: {v:,}" for k, v in parameters.items())
    return ModelCard.from_template(
        data,
        template_str=PUBLIC_TEMPLATE,
        model_name=model_name,
        public_data=public_data,
        training=training,
        parameters=params,
        repo_or_path=repo_or_path,
        grid=grid,
        fine_tune=_fine_tune_sentence(fine_tune),
    )


def _fine_tune_sentence(fine_tune: dict | None) -> str:
    if not fine_tune:
        return (
            "Unless told otherwise, it trains the attention blocks and the class embedder (the paper's choice) at "
            "learning rate 1e-3."
        )
    scope = fine_tune.get("trainable_scope")
    what = f"{SCOPE_DESCRIPTIONS[scope]} (`--trainable_scope {scope}`)" if scope else "the attention blocks"
    return (
        f"Unless told otherwise, it trains {what} and the class embedder at learning rate "
        f"{fine_tune['learning_rate']:g}, as this model's `pretraining.json` (`fine_tune_defaults`) recommends."
    )


PRIVATE_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{% if private and not valid_release %}**NOT A VALID DP RELEASE: noise reproducible from the seed.** This run drew
its DP noise and Poisson sampling from its seed (`--insecure_reproducible_noise`, for debugging): anyone who knows
the seed can replay training and remove the noise. The ({{ epsilon_str }}, {{ delta_str }}) below is what the
accountant computed for the mechanism, not a guarantee this model has.
{% elif private %}**Differentially private:** ({{ epsilon_str }}, {{ delta_str }})-DP with
respect to {{ unit }} of the private training set, computed by Opacus' `{{ accountant }}` accountant from the
noise multiplier, sample rate and number of steps that actually ran (epsilon rounded up).
{% else %}**NOT differentially private.** This is a non-private baseline (`--disable_dp`): it memorises and can
leak its training images. Do not publish it where DP is expected.
{% endif %}

{{ description }} fine-tuned with [dp-diffusers](https://github.com/dp-diffusers/dp-diffusers)
(DP-LDM, arXiv 2305.15759): a public model was pre-trained on public data, then only part of it was fine-tuned on
the private data{% if private %} with DP-SGD{% endif %}: {{ trained_parameters_kind }}. The rest, the autoencoder
included, kept its public weights.

## Privacy
| | |
|---|---|
| private | {{ private }} |
| epsilon (spent, rounded up) | {{ epsilon_str }} |
| target epsilon | {{ target_epsilon }} |
| delta | {{ delta_str }}{% if delta_defaulted %} (default from N: the largest power of ten <= 1/(10 N), \
at most 1e-5){% endif %} |
| accountant | {{ accountant }} |
| noise multiplier (sigma) | {{ sigma_str }} |
| max grad norm (C, per-example flat clipping) | {{ max_grad_norm }} |
| sampling | {% if private %}Poisson, {% endif %}sample rate q = {{ q_str }} (expected batch \
{{ expected_batch_size }} of N = {{ dataset_size }}) |
| steps / epochs | {{ steps }} / {{ epochs_str }} |
{% if randomness %}| noise drawn from | {{ randomness.noise_source }}; {{ randomness.gaussian_sampling }} |
| Poisson sampling drawn from | {{ randomness.sampling_source }} |
{% endif -%}
| noise multiplicity | {{ noise_multiplicity }} |
| processes | {{ world_size }} |
| DP library | {{ dp_library }} |
| unit of privacy | {{ unit }} |

## What was trained on what
- **Public base model:** {{ base_model_str }}, pre-trained on {{ base_data }}. It saw no private data; it is
  not covered by (and needs no) privacy guarantee.
- **Private data:** {{ private_data }}. Only these parameters were trained on it: {{ trained_modules }}
  ({{ "{:,}".format(trainable_parameters) }} of {{ "{:,}".format(total_parameters) }} parameters,
  {{ "%.1f"|format(100 * trainable_parameters / total_parameters) }}%). Every other weight is bit-identical to the
  public base model.
- **Trained parameters:** {{ trained_parameters_kind }}{% if lora %} ({{ lora.format }}: {{ lora.load }}){% endif %}.
{% if private_latent_cache %}- **Private latents:** the private images' latents were cached on the training machine
  ({{ private_latent_cache }}). They are private data: not part of this release, never uploaded; delete them when
  no longer needed.
{% endif %}
## What is and is not protected
- Protected: whether any single training image was in the private set. The guarantee covers the released weights
  and anything computed from them (samples, EMA: post-processing).
- Not protected: properties shared by many images of the private set (that is what the model learns), and the
  public data. Each example's label is part of the example.
- Treated as public, as is standard for Poisson sampling under add/remove-one adjacency: the dataset size
  N = {{ dataset_size }} (the sample rate{% if delta_defaulted %} and the default delta{% endif %} depend on it).
{% if label_set %}- Treated as public: the label set ({{ label_set.classes }} class names). It comes from
  {{ label_set.declared_by }}, never from the private labels.
{% endif %}{% if private_loss_logged %}- NOT covered: the training loss was logged during training
  (`--log_private_loss`). It is computed from the private data without noise; the logs are not part of this
  release and must not be published.
{% endif %}{% if previous_release %}- An earlier release trained on the same private data was written to this
  folder before this run (epsilon {{ previous_epsilon_str }}): anyone who has seen both models has seen both
  runs, and their privacy costs add up (composition), to at least epsilon {{ previous_epsilon_str }} +
  {{ epsilon_str }}.
{% endif %}- Hyper-parameters: {{ tuning }}
- Bad randomness, a wrong dataset size or a code change after training would void the guarantee; the numbers above
  are exactly those the run used (`privacy.json`).{% if valid_release %} The noise and the sampling masks are
  secret: no seed or generator state that could replay them is in any output or checkpoint.{% endif %}

## Usage
```python
{{ usage }}
```

{% if grid %}## Samples
![samples]({{ grid }}){% if grid_note %}

{{ grid_note }}{% endif %}{% endif %}
"""


def private_model_card(
    *,
    privacy: dict,
    model_name: str,
    base_data: str,
    private_data: str,
    repo_or_path: str,
    tuning: str = "not tuned on the private data by this run (defaults or user-supplied values); settings chosen by "
    "looking at the private data, or at results on it, are not covered.",
    grid: str | None = None,
    grid_note: str | None = None,
    datasets: list[str] | None = None,
    description: str = "A class-conditional latent diffusion model",
    usage: str | None = None,
) -> ModelCard:
    """The card of a privately fine-tuned model; its numbers are those of ``privacy`` (the run's privacy.json).

    ``description`` says what the model is; ``usage`` is Python that loads it (default: ``DPLDMPipeline``)."""
    private = bool(privacy["private"])
    valid_release = private and privacy.get("valid_dp_release", True) is not False
    tags = ["diffusers", "differential-privacy", "dp-ldm", "latent-diffusion"]
    if not private:
        tags.append("not-differentially-private")
    elif not valid_release:
        tags.append("not-a-valid-dp-release")
    metadata = {
        key: privacy.get(key)
        for key in (
            "private",
            "epsilon",
            "delta",
            "accountant",
            "noise_multiplier",
            "max_grad_norm",
            "sample_rate",
            "steps",
            "noise_multiplicity",
            "dataset_size",
            "unit_of_privacy",
            "valid_dp_release",
        )
    }
    previous = privacy.get("previous_release") or None
    base_hub_id, base_model_str = _base_model(privacy.get("base_model"))
    data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=tags,
        base_model=base_hub_id,
        datasets=datasets,
        model_name=model_name,
        differential_privacy=metadata,
    )
    lib = privacy.get("dp_library") or {}
    values = dict(privacy)
    values.update(
        model_name=model_name,
        epsilon_str="n/a (not private)" if privacy.get("epsilon") is None else format_epsilon(privacy["epsilon"]),
        delta_str=format_epsilon(privacy.get("delta"), digits=3),
        delta_defaulted=privacy.get("delta_source") == "default",
        sigma_str=_short(privacy.get("noise_multiplier")),
        q_str=_short(privacy.get("sample_rate")),
        epochs_str=_short(privacy.get("epochs"), digits=3),
        valid_release=valid_release,
        base_model_str=base_model_str,
        previous_release=previous,
        previous_epsilon_str="n/a" if previous is None else format_epsilon(previous.get("epsilon")),
        unit=privacy.get("unit_of_privacy", "one training image"),
        dp_library=f"{lib.get('name', '')} {lib.get('version', '')}".strip() or "none",
        trained_modules=", ".join(f"`{m}`" for m in privacy.get("trained_modules", [])),
        base_data=base_data,
        private_data=private_data,
        repo_or_path=repo_or_path,
        tuning=tuning,
        grid=grid,
        grid_note=grid_note,
        private=private,
        description=description,
        usage=usage
        or (
            f'from dp_diffusers import DPLDMPipeline\n\npipe = DPLDMPipeline.from_pretrained("{repo_or_path}")\n'
            "images = pipe(class_labels=list(range(10)), num_inference_steps=50).images"
        ),
        # What trained (scope, LoRA, embedder), in the words train_dp_ldm.py's privacy.json gives it.
        trained_parameters_kind=privacy["trained_parameters_kind"],
        lora=privacy.get("lora"),
    )
    return ModelCard.from_template(data, template_str=PRIVATE_TEMPLATE, **values)
