"""revq-pipe: Quantize-then-Rectify (ReVQ) tokenizers from frozen pre-trained VAEs.

    from revq_pipe import ReVQ
    model = ReVQ.from_pretrained("runs/512T")      # a run dir, or a Hugging Face id "user/repo"
    ids = model.tokenize_images(["photo.jpg"])     # (B, T) int64 token ids
    images = model.detokenize_images(ids)          # PIL images
"""

__version__ = "0.1.0"
__all__ = ["ReVQ", "ReVQConfig", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import revq_pipe` (what the CLI does for --help) stays free of torch.
    if name == "ReVQ":
        from revq_pipe.pipeline.model.revq import ReVQ

        return ReVQ
    if name == "ReVQConfig":
        from revq_pipe.pipeline.model.config import ReVQConfig

        return ReVQConfig
    raise AttributeError(f"module 'revq_pipe' has no attribute {name!r}")
