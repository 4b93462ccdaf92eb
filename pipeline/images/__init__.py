"""Images in: ImageFolder trees and webdataset shards as ordered blocks (`sources`, `folder_walk`),
encode's settings (`encode_config`), the frozen diffusers VAE (`vae`, `embedded_vae`), the loop
that feeds it blocks (`encode_feed`) and JPEG decoding on its device (`device_decode`), images to
tokens and back (`image_tokenizer`, with its inputs in `image_inputs`), pixels for image metrics
(`pixels`) and the bundled photos (`sample_images`)."""
