"""Media: decoding images, audio and text, the decode sandbox, and archive walking; torch-free."""

from media.decode import MediaError, decode_audio, decode_image, decode_text, modality_of
from media.sandbox import DecodeSandbox

__all__ = ["DecodeSandbox", "MediaError", "decode_audio", "decode_image", "decode_text",
           "modality_of"]
