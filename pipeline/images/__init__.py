"""Images in: ImageFolder trees and webdataset shards as ordered blocks (`sources`, `folder_walk`),
the frozen diffusers VAE (`vae`, `embedded_vae`), the image API's inputs (`image_inputs`), pixels
for image metrics (`pixels`) and the bundled photos (`sample_images`)."""
