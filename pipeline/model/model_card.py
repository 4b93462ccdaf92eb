"""The model card (README.md) that `ReVQ.save_pretrained` and `push_to_hub` write beside the weights
(pipeline/model/hub_mixin.py).

Rendered with huggingface_hub's `ModelCard.from_template`, so its YAML header is the hub's own
metadata (library, tags, pipeline); the body states what a user of the tokenizer needs: preset,
T, K, d, the VAE and image size, the training store's size, and the last epoch's metrics.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from revq_pipe.pipeline.model.config import ReVQConfig

LIBRARY_NAME = "revq-pipe"
TAGS = ["revq", "image-tokenizer", "vector-quantization"]

TEMPLATE = """---
{{ card_data }}
---

# ReVQ image tokenizer {{ name }}

A Quantize-then-Rectify (ReVQ) tokenizer: it turns the latents of a frozen VAE into {{ tokens }} token ids
per image ({{ codes }} codes per token position) and back. Made with revq-pipe.

| | |
|---|---|
| preset | `{{ preset }}` |
| tokens per image T | {{ tokens }} |
| codes per position K | {{ codes }} |
| code dim d | {{ dim }} |
| latent shape (C, H, W) | {{ latent_shape }} |
| split | {{ split }} |
| rectifier | {{ rectifier }} ({{ rectifier_form }}, width {{ rectifier_width }} x {{ rectifier_layers }}) |
| VAE | {{ vae }} |
| image size | {{ image_size }} |
| training latents | {{ train_count }} |
| epochs trained | {{ epochs }} |
{% for label, value in metrics %}| {{ label }} | {{ value }} |
{% endfor %}
## Use

```python
from revq_pipe import ReVQ, ReVQImageTokenizer

model = ReVQ.from_pretrained("{{ repo_id }}")
tokenizer = ReVQImageTokenizer(model)               # with the VAE above
ids = tokenizer.tokenize_images(["photo.jpg"])      # (1, {{ tokens }}) int64, through the VAE
images = tokenizer.detokenize_images(ids)           # list of PIL images
```
"""

# Last-epoch metrics shown on the card, in this order, with their labels.
CARD_METRICS = (
    ("val_mse", "validation latent MSE (normalised)"),
    ("val_mse_quantizer", "validation latent MSE, quantizer alone (normalised)"),
    ("val_mse_raw", "validation latent MSE (raw)"),
    ("val_usage_mean_pct", "validation code usage (%)"),
    ("val_perplexity", "validation perplexity"),
    ("codebook_loss", "last epoch codebook loss"),
    ("rectifier_loss", "last epoch rectifier loss"),
    ("usage_mean_pct", "last epoch code usage (%)"),
    ("perplexity", "last epoch perplexity"),
)
UNKNOWN = "not recorded"


def model_card(config: ReVQConfig, summary: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The card for a model of `config`; `summary` is `training_record.training_summary` ({} if unknown)."""
    final = summary.get("final", {})
    metrics = [(label, _number(final[key])) for key, label in CARD_METRICS if key in final]
    card_data = ModelCardData(library_name=LIBRARY_NAME, tags=list(TAGS), pipeline_tag="image-feature-extraction")
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE, name=config.name, preset=config.preset, tokens=config.tokens,
        codes=config.codes, dim=config.dim, latent_shape=tuple(config.latent_shape), split=config.split,
        rectifier=config.rectifier, rectifier_form=config.rectifier_form, rectifier_width=config.rectifier_width,
        rectifier_layers=config.rectifier_layers, vae=config.vae or UNKNOWN, image_size=config.image_size or UNKNOWN,
        train_count=summary.get("train_count", UNKNOWN), epochs=summary.get("epochs", UNKNOWN), metrics=metrics,
        repo_id=repo_id or "path/to/run",
    )


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
