"""Train the package's embedded default VAE: a small diffusers AutoencoderDC on offline photographs.

    python scripts/train_embedded_vae.py --out pipeline/images/assets/embedded-vae [--steps N]

The model is trained at EMBEDDED_IMAGE_SIZE on random square crops (random place and scale, random
horizontal flips) of the bundled photographs in TRAIN_PHOTOS and GRAY_PHOTOS (grey ones as RGB, for
texture variety). HOLDOUT_PHOTOS are never seen in training: the reported PSNR/SSIM come from them.
The seven colour photos cover few hues, so crops are augmented (--augment, the default): colour crops
get hue rotation, channel permutation, saturation/brightness/contrast jitter and rare inversion; grey
crops get random duotone tints; a few crops are smoothed (see jitter_colours, tint_grey, TrainingCrops).
Without it the model learns the photos' palette: dark-blue or teal flat areas came back grey/purple.
Images are RGB scaled to [-1, 1], the range DC-AE uses. Loss: L1 + MSE on pixels; AdamW with a
linear warm-up and a cosine decay.

Every batch is drawn from a generator seeded with (seed, step), so a run that is stopped and resumed
with --resume sees exactly the batches an uninterrupted run would. Checkpoints and the progress log
go to --work-dir (ignored by git); --out receives save_pretrained's files and training_record.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from revq_pipe.pipeline.images.embedded_vae import EMBEDDED_IMAGE_SIZE, EMBEDDED_LATENT_SHAPE
from revq_pipe.pipeline.images.sample_images import GRAY_PHOTOS, HOLDOUT_PHOTOS, TRAIN_PHOTOS, load_photo, photo_crops

# 8x spatial compression (three DC down/up blocks after a pixel-unshuffle stem) to 16 channels:
# 64 px -> (16, 8, 8). ResBlocks only: linear attention buys little at 8x8 and costs CPU time.
# A first level with no layers makes the stem a stride-1 conv + pixel-unshuffle, as in DC-AE,
# so no layer runs at full resolution; the decoder gets the extra depth, where quality is made.
# Widths double as resolution halves (32 px: 32, 16 px: 64, 8 px: 128): ~1.6 M parameters and
# ~0.45 GFLOP per 64 px image forward, sized for a shared 2-core CPU.
ARCHITECTURE = dict(
    in_channels=3,
    latent_channels=EMBEDDED_LATENT_SHAPE[0],
    encoder_block_types="ResBlock",
    decoder_block_types="ResBlock",
    encoder_block_out_channels=(16, 32, 64, 128),
    decoder_block_out_channels=(16, 32, 64, 128),
    encoder_layers_per_block=(0, 1, 1, 1),
    decoder_layers_per_block=(0, 2, 2, 2),
    encoder_qkv_multiscales=((), (), (), ()),
    decoder_qkv_multiscales=((), (), (), ()),
)

# Colour photos are what users encode; the grey ones add textures (grass, gravel, brick, coins).
GRAY_FRACTION = 0.25
# Augmentation (--augment on): colour jitter of colour crops, duotone tint of grey crops, smooth crops.
COLOUR_JITTER_P, GREY_TINT_P, SMOOTH_P = 0.8, 0.5, 0.05
# Crop sides are drawn uniformly between the model's size and the photo's short side, then resized.
MIN_CROP_SIDE = EMBEDDED_IMAGE_SIZE
# Held-out evaluation: photo_crops() of HOLDOUT_PHOTOS with its default min_side, resized to size.
EVAL_CROPS, EVAL_SEED = 64, 2024
# Progress validation uses fresh crops of the *training* photos, so that nothing is tuned on holdout.
VALIDATION_CROPS, VALIDATION_SEED = 64, 7
# Latent statistics are measured on this many training-photo crops.
STATISTICS_CROPS, STATISTICS_SEED = 512, 11


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for save_pretrained + training_record.json")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/embedded-vae"), help="checkpoint and log dir")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads; 1 runs faster where other busy processes share the cores (no spinning at barriers)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="continue from --work-dir/checkpoint.pt")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="colour jitter, grey tints and smooth crops (see TrainingCrops); --no-augment for plain crops")
    parser.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    return parser.parse_args(argv)


def build_model(architecture: dict, seed: int) -> AutoencoderDC:
    torch.manual_seed(seed)
    return AutoencoderDC(**architecture)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (N, 3, H, W) float32 in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(batch: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as an image file would hold it."""
    return batch.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def jitter_colours(image: Image.Image, rng: np.random.Generator, p: float | None = None) -> Image.Image:
    """Colour augmentation of one RGB crop: the bundled colour photos cover few hues (almost no flat
    blue or teal areas), so hues are rotated and channels permuted to teach colour, not a palette.

    With COLOUR_JITTER_P: hue rotation (uniform over the circle, p=0.5), RGB channel permutation
    (uniform over the 6 orders, p=0.5), saturation x loguniform[0.5, 1.6], brightness x [0.75, 1.25],
    contrast x [0.75, 1.25], inversion p=0.05. Otherwise the crop is left as it is.
    """
    if rng.random() >= (COLOUR_JITTER_P if p is None else p):
        return image
    if rng.random() < 0.5:
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(256))) % 256
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    array = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        array = array[..., rng.permutation(3)]
    grey = array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    saturation = float(np.exp(rng.uniform(np.log(0.5), np.log(1.6))))
    array = grey[..., None] + saturation * (array - grey[..., None])
    array = array * rng.uniform(0.75, 1.25)
    mean = array.mean()
    array = mean + rng.uniform(0.75, 1.25) * (array - mean)
    if rng.random() < 0.05:
        array = 255.0 - array
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


def tint_grey(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Duotone of a grey crop: black -> one random colour, white -> another (p=GREY_TINT_P). The grey
    photos' flat areas (the moon's sky, the camera's background) then come in every hue."""
    if rng.random() >= GREY_TINT_P:
        return image
    dark, light = rng.uniform(0, 110, 3), rng.uniform(145, 255, 3)
    if rng.random() < 0.5:
        dark, light = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0
    array = dark + grey * (light - dark)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


class TrainingCrops:
    """Random training crops of the bundled photos, reproducible per (seed, step)."""

    def __init__(self, image_size: int, seed: int, augment: bool = True):
        self.image_size = image_size
        self.seed = seed
        self.augment = augment
        self.color = [load_photo(name) for name in TRAIN_PHOTOS]
        self.gray = [load_photo(name) for name in GRAY_PHOTOS]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        images = []
        for _ in range(batch_size):
            is_gray = rng.random() < GRAY_FRACTION
            pool = self.gray if is_gray else self.color
            photo = pool[int(rng.integers(len(pool)))]
            width, height = photo.size
            side = int(rng.integers(MIN_CROP_SIDE, min(width, height) + 1))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = photo.crop((left, top, left + side, top + side))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # reducing_gap: a fast box pre-reduction for the large crops; the result is the same to the eye.
            crop = crop.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, reducing_gap=3.0)
            if self.augment:
                # Drawn after the crop, so the crops themselves are those of an unaugmented run.
                if rng.random() < SMOOTH_P:
                    # A smooth crop: the picture through a 8-16 px bottleneck, for flat areas and gradients.
                    small = int(rng.integers(8, 17))
                    crop = crop.resize((small, small), Image.Resampling.BOX).resize(
                        (self.image_size, self.image_size), Image.Resampling.BICUBIC)
                crop = tint_grey(crop, rng) if is_gray else jitter_colours(crop, rng)
            images.append(crop)
        return to_tensor(images)


def colour_shifted(images: torch.Tensor, seed: int) -> torch.Tensor:
    """The images with every colour jitter applied (hue, channel order, saturation...), fixed by seed."""
    rng = np.random.default_rng(seed)
    pil = [Image.fromarray(array) for array in to_uint8(images)]
    return to_tensor([jitter_colours(image, rng, p=1.0) for image in pil])


def fixed_crops(names: tuple[str, ...], count: int, seed: int, image_size: int) -> torch.Tensor:
    return to_tensor([image for _, image in photo_crops(names, count, seed=seed, out_size=image_size)])


@torch.no_grad()
def reconstruction_quality(model: AutoencoderDC, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean PSNR (dB) and SSIM of round trips, measured on uint8 images like files a user would see."""
    model.eval()
    psnrs, ssims = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        reconstruction = model.decode(model.encode(batch).latent).sample
        for original, decoded in zip(to_uint8(batch), to_uint8(reconstruction)):
            psnrs.append(peak_signal_noise_ratio(original, decoded, data_range=255))
            ssims.append(structural_similarity(original, decoded, channel_axis=-1, data_range=255))
    model.train()
    return {"psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "crops": len(images)}


@torch.no_grad()
def latent_statistics(model: AutoencoderDC, images: torch.Tensor, batch_size: int = 64) -> dict:
    model.eval()
    latents = torch.cat([model.encode(images[i : i + batch_size]).latent for i in range(0, len(images), batch_size)])
    model.train()
    channel_mean = latents.mean(dim=(0, 2, 3))
    channel_std = latents.std(dim=(0, 2, 3))
    rms = latents.pow(2).mean().sqrt().item()
    return {
        "latent_shape": list(latents.shape[1:]),
        "crops": len(images),
        "mean": latents.mean().item(),
        "std": latents.std().item(),
        "rms": rms,
        "min": latents.min().item(),
        "max": latents.max().item(),
        "channel_mean_range": [channel_mean.min().item(), channel_mean.max().item()],
        "channel_std_range": [channel_std.min().item(), channel_std.max().item()],
        "channel_mean": [round(v, 4) for v in channel_mean.tolist()],
        "channel_std": [round(v, 4) for v in channel_std.tolist()],
    }


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then a cosine decay to 2% of the peak rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, train_seconds: float) -> None:
    # Written aside and renamed, so a kill during the write never leaves a broken checkpoint.
    partial = path.with_suffix(".partial")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "train_seconds": train_seconds}, partial)
    partial.replace(path)


def resume_state(checkpoint_path: Path, model, optimizer, scheduler) -> tuple[int, float]:
    """Load the checkpoint into the model, optimizer and scheduler: (step, training seconds so far)."""
    state = torch.load(checkpoint_path, map_location="cpu")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    print(f"resumed at step {state['step']}", flush=True)
    return state["step"], state["train_seconds"]


def train(args: argparse.Namespace, model, optimizer, scheduler, step: int, train_seconds: float,
          checkpoint_path: Path) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Train from `step` to args.steps, logging validation quality and checkpointing as asked:
    (training seconds in all, the validation crops, the same crops colour-shifted)."""
    crops = TrainingCrops(EMBEDDED_IMAGE_SIZE, args.seed, augment=args.augment)
    validation = fixed_crops(TRAIN_PHOTOS, VALIDATION_CROPS, VALIDATION_SEED, EMBEDDED_IMAGE_SIZE)
    # The same crops with their colours shifted: how well colours generalise, still without the holdout.
    validation_shifted = colour_shifted(validation, VALIDATION_SEED)

    started = time.time()
    window_loss, window_started = 0.0, time.time()
    model.train()
    while step < args.steps:
        images = crops.batch(step, args.batch_size)
        reconstruction = model.decode(model.encode(images).latent).sample
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        window_loss += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            seconds_per_step = (time.time() - window_started) / args.log_every
            quality = reconstruction_quality(model, validation)
            shifted = reconstruction_quality(model, validation_shifted)
            print(f"step {step}/{args.steps} loss {window_loss / args.log_every:.4f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} {seconds_per_step:.2f} s/step "
                  f"train-photo val PSNR {quality['psnr_db']:.2f} dB SSIM {quality['ssim']:.3f} "
                  f"colour-shifted {shifted['psnr_db']:.2f} dB "
                  f"elapsed {(train_seconds + time.time() - started) / 60:.1f} min", flush=True)
            window_loss, window_started = 0.0, time.time()
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, step,
                            train_seconds + time.time() - started)
    return train_seconds + time.time() - started, validation, validation_shifted


def training_record(args: argparse.Namespace, argv: list[str] | None, parameters: int, results: dict) -> dict:
    """training_record.json: the command, the settings, the data and augmentation, and `results`."""
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay,
                      "warmup_steps": args.warmup_steps, "schedule": "linear warm-up, cosine decay to 2%"},
        "loss": "L1 + MSE on pixels in [-1, 1]",
        "image_size": EMBEDDED_IMAGE_SIZE,
        "parameters": parameters,
        "save_dtype": args.save_dtype,
        "data": {
            "train_photos": list(TRAIN_PHOTOS),
            "gray_photos_as_rgb": list(GRAY_PHOTOS),
            "gray_fraction": GRAY_FRACTION,
            "crops": f"square, side uniform in [{MIN_CROP_SIDE}, short side], uniform place, "
                     f"horizontal flip p=0.5, bicubic resize to {EMBEDDED_IMAGE_SIZE}; "
                     "generator numpy default_rng([seed, step])",
            "augmentation": (
                "none" if not args.augment else
                f"colour crops, p={COLOUR_JITTER_P}: hue rotation uniform over the circle (p=0.5, PIL HSV), "
                "RGB channel permutation uniform over the 6 orders (p=0.5), saturation x loguniform[0.5, 1.6], "
                "brightness x U[0.75, 1.25], contrast x U[0.75, 1.25] about the mean, inversion p=0.05; "
                f"grey crops, p={GREY_TINT_P}: duotone tint (black -> random dark colour, white -> random light "
                "colour; half the time both colours fully random); any crop, "
                f"p={SMOOTH_P}: smoothed through a box-downsample to 8-16 px and a bicubic upsample; "
                "drawn from the same per-step generator, after the crop"),
            "holdout_photos": list(HOLDOUT_PHOTOS),
            # sample_images.photo_crops(holdout_photos, count, seed=seed, out_size=size): tests re-measure it.
            "holdout_crops": {"count": EVAL_CROPS, "seed": EVAL_SEED, "size": EMBEDDED_IMAGE_SIZE},
        },
        **results,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.work_dir / "checkpoint.pt"

    model = build_model(ARCHITECTURE, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, args.warmup_steps, args.steps))
    step, train_seconds = 0, 0.0
    if args.resume and checkpoint_path.exists():
        step, train_seconds = resume_state(checkpoint_path, model, optimizer, scheduler)

    parameters = sum(p.numel() for p in model.parameters())
    print(f"AutoencoderDC with {parameters / 1e6:.2f} M parameters; {args.steps} steps of {args.batch_size}", flush=True)
    train_seconds, validation, validation_shifted = train(args, model, optimizer, scheduler, step, train_seconds,
                                                          checkpoint_path)

    final_validation = reconstruction_quality(model, validation)
    final_shifted = reconstruction_quality(model, validation_shifted)
    statistics = latent_statistics(model, fixed_crops(TRAIN_PHOTOS, STATISTICS_CROPS, STATISTICS_SEED, EMBEDDED_IMAGE_SIZE))
    # DC-AE's convention: scaling_factor is the inverse RMS of the latents, for diffusion-style consumers.
    model.register_to_config(scaling_factor=round(1.0 / statistics["rms"], 5))
    holdout_images = fixed_crops(HOLDOUT_PHOTOS, EVAL_CROPS, EVAL_SEED, EMBEDDED_IMAGE_SIZE)
    holdout = reconstruction_quality(model, holdout_images)
    if args.save_dtype == "float16":
        model = model.to(torch.float16)
    model.save_pretrained(args.out, safe_serialization=True)
    if args.save_dtype == "float16":
        # Quality as shipped: weights rounded to float16, computed in float32 as CPU users would.
        holdout = reconstruction_quality(AutoencoderDC.from_pretrained(args.out, torch_dtype=torch.float32), holdout_images)

    record = training_record(args, argv, parameters, {
        "holdout": holdout,
        # Measured at the end on fresh crops of the training photos (what the training log follows).
        "train_photo_validation": {"crops": f"photo_crops(TRAIN_PHOTOS, {VALIDATION_CROPS}, seed={VALIDATION_SEED})",
                                   "psnr_db": final_validation["psnr_db"], "ssim": final_validation["ssim"],
                                   "colour_shifted_psnr_db": final_shifted["psnr_db"]},
        "latent_statistics": {"crops": f"photo_crops(TRAIN_PHOTOS, {STATISTICS_CROPS}, seed={STATISTICS_SEED})",
                              **statistics},
        "train_minutes": round(train_seconds / 60, 1),
    })
    (args.out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"holdout": holdout, "latent_channel_mean_range": statistics["channel_mean_range"],
                      "latent_channel_std_range": statistics["channel_std_range"]}), flush=True)


if __name__ == "__main__":
    main()
