"""What the toy world is made of: classes, styles, colours, sizes, backgrounds.

Every attribute is an integer code into one of the tuples below; the names in
the tuples are the words captions use. An image of the world is one shape
(its class) of one colour and size, drawn in one style on one background.

Styles come in three families, chosen so that different prompt templates match
different images:
  * photos (`PHOTO_STYLES`): a filled, shaded shape on a textured background,
    then one degradation (blur, darkness, grey scale, contrast, pixelation,
    grain) or none ('photo');
  * line art: 'drawing' (a clean ink outline on paper) and 'sketch' (a broken
    grey pencil outline with light hatching on paper);
  * 'cartoon': a flat fill with a thick black outline on a plain pastel ground.
"""

from __future__ import annotations

import numpy as np

# Bump when anything changes the pixels or captions a seed produces.
GENERATOR_VERSION = "toy_world/2"

IMAGE_SIZE = 32

# The class names as captions and prompts use them, in label order. One word
# each, so that a word-level tokenizer sees every class as one token.
TOY_CLASSES = (
    "circle", "square", "triangle", "star", "cross",
    "heart", "hexagon", "ring", "arrow", "crescent",
)
NUM_CLASSES = len(TOY_CLASSES)

# Rendering styles. The name is the noun phrase captions use ("a {style} of a
# star."), except 'cartoon', which is also used as an adjective.
STYLES = (
    "photo",                   # 0: clean, well lit
    "blurry photo",            # 1: Gaussian blur
    "dark photo",              # 2: under-exposed
    "black and white photo",   # 3: grey scale
    "low contrast photo",      # 4: washed out
    "high contrast photo",     # 5: saturated, clipped
    "pixelated photo",         # 6: block-downsampled
    "noisy photo",             # 7: heavy grain
    "drawing",                 # 8: ink outline on paper
    "sketch",                  # 9: pencil outline on paper
    "cartoon",                 # 10: flat fill, black outline
)
(PHOTO, BLURRY, DARK, BLACK_AND_WHITE, LOW_CONTRAST, HIGH_CONTRAST, PIXELATED,
 NOISY, DRAWING, SKETCH, CARTOON) = range(len(STYLES))
PHOTO_STYLES = (PHOTO, BLURRY, DARK, BLACK_AND_WHITE, LOW_CONTRAST,
                HIGH_CONTRAST, PIXELATED, NOISY)
# Photos a caption may call "bad": visibly degraded. 'good' is only 'photo'.
BAD_PHOTO_STYLES = (BLURRY, DARK, LOW_CONTRAST, PIXELATED, NOISY)
# Sampling weights: plain photos are the most common, as on the web; the rest
# are equally likely so that every style-specific template has support.
STYLE_WEIGHTS = np.array([3, 1, 1, 1, 1, 1, 1, 1, 1.5, 1.5, 1.5], np.float64)
STYLE_WEIGHTS = STYLE_WEIGHTS / STYLE_WEIGHTS.sum()

# Named colours and their prototype RGB; each image jitters its prototype.
COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple",
    "pink", "brown", "black", "white", "gray", "cyan",
)
COLOUR_RGB = np.array([
    [0.86, 0.12, 0.10],   # red
    [0.96, 0.55, 0.08],   # orange
    [0.95, 0.88, 0.14],   # yellow
    [0.15, 0.64, 0.20],   # green
    [0.14, 0.30, 0.86],   # blue
    [0.55, 0.20, 0.72],   # purple
    [0.96, 0.52, 0.72],   # pink
    [0.50, 0.30, 0.12],   # brown
    [0.07, 0.07, 0.07],   # black
    [0.96, 0.96, 0.96],   # white
    [0.50, 0.50, 0.50],   # gray
    [0.12, 0.80, 0.86],   # cyan
], np.float32)
# Ink colours a drawing on light paper can use (light inks would vanish).
DRAWING_COLOURS = tuple(COLOURS.index(c) for c in
                        ("red", "green", "blue", "purple", "brown", "black"))
# Styles whose images show no colour (grey scale, grey pencil): their colour
# attribute is NO_COLOUR and captions never name one.
COLOURLESS_STYLES = (BLACK_AND_WHITE, SKETCH)
NO_COLOUR = -1

# Size classes and the shape's circumradius in pixels (of a 32-pixel image).
# Even 'small' shapes span about half the image: at 32 pixels a smaller shape
# covers one or two 8x8 patches of the image tower, too little to tell its
# class from.
SIZES = ("small", "medium", "big")
SMALL, MEDIUM, BIG = range(len(SIZES))
SIZE_RADIUS = np.array([[7.0, 9.0], [9.0, 11.5], [11.5, 14.0]], np.float32)
# Words a caption may use for a size; 'medium' is never said.
SIZE_WORDS = ((SMALL, ("small",)), (BIG, ("big", "large")))

# Backgrounds, by the adjective captions use ("on a striped background").
# 'paper' is the ground of line art ("on paper").
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "textured",
               "paper")
PLAIN, GRADIENT, STRIPED, CHECKERED, TEXTURED, PAPER = range(len(BACKGROUNDS))
PHOTO_BACKGROUNDS = (PLAIN, GRADIENT, STRIPED, CHECKERED, TEXTURED)
CARTOON_BACKGROUNDS = (PLAIN, GRADIENT)

# Shapes are tilted by up to this angle either way (radians): objects in
# photos are mostly upright, and a small model trained for minutes on a CPU
# learns upright shapes far faster than freely rotated ones (in a probe, 67%
# against 46% accuracy after the same 3200 steps).
MAX_TILT = np.pi / 6

# Shape-family parameter ranges, in units of the circumradius. Each image
# draws one number in [0, 1] (`shape_param`) that moves its shape within its
# class (a star's inner radius, a ring's thickness, ...), so that no class is
# a single template.
STAR_INNER = (0.38, 0.55)
CROSS_ARM_HALF_WIDTH = (0.20, 0.34)
RING_THICKNESS = (0.22, 0.40)
CRESCENT_CUT_OFFSET = (0.35, 0.60)
SQUARE_CORNER = (0.0, 0.18)
