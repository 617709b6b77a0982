"""Networks: pixel UNet, SD1 (CLIP text encoder, KL-VAE, UNet), shared blocks."""
