"""What the tokens of a multimodal model stand for: image tokens as patches of their image, audio frames as time."""

from .audio_frames import AudioFrames, audio_frame_families, audio_frames
from .image_tokens import ImageTokens, ImageView, image_token_map, image_token_families

__all__ = ["ImageTokens", "ImageView", "image_token_map", "image_token_families", "AudioFrames", "audio_frames",
           "audio_frame_families"]
