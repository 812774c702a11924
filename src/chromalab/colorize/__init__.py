"""`chromalab colorize`: colour your own photos at their full resolution.

The models work on S×S lightness (S = 256 for the U-Net). A photo keeps its own detail because only its
colour comes from the model: L is computed at the original resolution, a resized S×S copy goes through the
model, the predicted ab (smooth by nature) is upsampled back to the original size and joined with the
full-resolution L. A 12-megapixel photo comes back 12 megapixels, as sharp as it went in.

Non-square photos are squashed to S×S for the model and the ab map is stretched back: the model sees a
distorted photo, but colour varies slowly, and the detail, which comes from L, is never resampled.

Any colour already in an input is discarded (only its lightness is used); alpha is kept. Output formats:
JPEG (quality 95), PNG and WebP stay what they were; every other format (BMP, TIFF, 16-bit…) becomes
8-bit PNG. EXIF orientation is applied to the pixels; the rest of the photo's EXIF (date, camera, copyright)
is kept, with chromalab's own Software tag; its colour profile is not (the colours are computed as sRGB).
"""

from chromalab.colorize.command import (
    COMPARE_TAG,
    OUTPUT_TAG,
    ColorizeReport,
    Job,
    colorize_paths,
    output_name,
    plan_jobs,
)
from chromalab.files import PHOTO_SUFFIXES, READ_ERRORS
from chromalab.colorize.model import limit_model_threads, load_colorizer, model_file, model_input_size
from chromalab.colorize.photos import (
    COMPARE_MAX_SIDE,
    Photo,
    UnreadablePhoto,
    ab_rows,
    colour_bytes,
    colour_photo,
    compare_sheet,
    lab_image,
    read_photo,
    save_atomic,
)

__all__ = ["COMPARE_MAX_SIDE", "COMPARE_TAG", "OUTPUT_TAG", "PHOTO_SUFFIXES", "READ_ERRORS", "ColorizeReport", "Job",
           "Photo", "UnreadablePhoto", "ab_rows", "colorize_paths", "colour_bytes", "colour_photo", "compare_sheet",
           "lab_image",
           "limit_model_threads", "load_colorizer", "model_file", "model_input_size", "output_name", "plan_jobs",
           "read_photo", "save_atomic"]
