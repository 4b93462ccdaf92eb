"""The small pre-trained VAE shipped with the package: the default when no hub model is at hand."""

from pathlib import Path

# A diffusers AutoencoderDC saved with save_pretrained (config.json + safetensors weights).
EMBEDDED_VAE_DIR = Path(__file__).parent / "assets" / "embedded-vae"
# The square input size the embedded VAE was trained at (its native size).
EMBEDDED_IMAGE_SIZE = 64
