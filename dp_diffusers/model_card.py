"""Model cards (``README.md``) for public and private pipelines, made with huggingface_hub's ``ModelCard``."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

PUBLIC_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A class-conditional latent diffusion model (`DPLDMPipeline` of
[dp-diffusers](https://github.com/dp-diffusers/dp-diffusers)): `AutoencoderKL` + `UNet2DConditionModel` whose
`Transformer2DModel` blocks cross-attend to a `ClassEmbedder`, DDIM sampling.

**Not differentially private, and it does not need to be:** it was trained on public data only:
{{ public_data }}.
It is a public starting point for private fine-tuning with `train_dp_ldm.py`, which trains only its attention blocks
and class embedder with DP-SGD.

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
) -> ModelCard:
    """The card of a model pre-trained on public data (``examples/pretrain_public_ldm.py``)."""
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
    )
