"""Models built from the eventful core: factorized ViViT, ViTDet, timm ViTs."""
