"""What the tokens of a multimodal model stand for: image tokens as patches of their image, audio frames as time."""

from .image_tokens import ImageTokens, ImageView, image_token_map, image_token_families

__all__ = ["ImageTokens", "ImageView", "image_token_map", "image_token_families"]
