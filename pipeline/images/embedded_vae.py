"""The small pre-trained VAE shipped with the package: the default when no hub model is at hand.

It is a diffusers AutoencoderDC (the class of DC-AE f32c32) trained by scripts/train_embedded_vae.py
on bundled photographs; like DC-AE it takes RGB images scaled to [-1, 1].
"""

from pathlib import Path

# A diffusers AutoencoderDC saved with save_pretrained (config.json + safetensors weights), plus
# training_record.json (seed, data, steps, command, held-out PSNR/SSIM, latent statistics).
EMBEDDED_VAE_DIR = Path(__file__).parent / "assets" / "embedded-vae"
# The name stores and runs record for it, wherever the package is installed; `--vae` also takes the alias.
EMBEDDED_VAE_NAME = "revq-pipe-embedded"
EMBEDDED_VAE_NAMES = (EMBEDDED_VAE_NAME, "embedded")
# The square input size the embedded VAE was trained at (its native size).
EMBEDDED_IMAGE_SIZE = 64
# Its latent (C, H, W) at the native size: 8x spatial compression to 16 channels.
EMBEDDED_LATENT_SHAPE = (16, EMBEDDED_IMAGE_SIZE // 8, EMBEDDED_IMAGE_SIZE // 8)
