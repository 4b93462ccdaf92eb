"""revq-pipe: Quantize-then-Rectify (ReVQ) tokenizers from frozen pre-trained VAEs.

    from revq_pipe import ReVQ, ReVQImageTokenizer
    model = ReVQ.from_pretrained("runs/512T")      # a run dir, or a Hugging Face id "user/repo"
    ids = model.tokenize(latents)                  # (B, C, H, W) VAE latents -> (B, T) int64 token ids
    tokenizer = ReVQImageTokenizer(model)          # with the VAE the model records (or vae=...)
    ids = tokenizer.tokenize_images(["photo.jpg"]) # images -> (B, T) int64 token ids
    images = tokenizer.detokenize_images(ids)      # PIL images
"""

__version__ = "0.1.0"
__all__ = ["ReVQ", "ReVQConfig", "ReVQImageTokenizer", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import revq_pipe` (what the CLI does for --help) stays free of torch.
    if name == "ReVQ":
        from revq_pipe.pipeline.model.revq import ReVQ

        return ReVQ
    if name == "ReVQConfig":
        from revq_pipe.pipeline.model.config import ReVQConfig

        return ReVQConfig
    if name == "ReVQImageTokenizer":
        from revq_pipe.pipeline.images.image_tokenizer import ReVQImageTokenizer

        return ReVQImageTokenizer
    raise AttributeError(f"module 'revq_pipe' has no attribute {name!r}")
