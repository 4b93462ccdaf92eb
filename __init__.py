"""revq-pipe: Quantize-then-Rectify (ReVQ) tokenizers from frozen pre-trained VAEs."""

__version__ = "0.1.0"
