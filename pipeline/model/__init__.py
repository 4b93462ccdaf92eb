"""The ReVQ model: its config and presets (`config`), the model itself (`revq`: tensors only), how it
is saved, loaded and published (`hub_mixin`), the rectifier kinds (`rectifier`) and their networks
(`rectifier_networks`), the weights' checksum (`weights`), its model card (`model_card`) and the
paper's released checkpoints (`paper_checkpoint`)."""
