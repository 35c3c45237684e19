"""`python -m service.datasets.inspect_entry PATH MAX_BYTES MAX_SAMPLES MAX_IMAGE_PIXELS LAYOUT`:
inspect one dataset upload (zip, .npy headers, every image decoded by Pillow) and print JSON.

Runs inside service.sandbox, like service.models.inspect_entry: a decoder that loops or inflates
an image past the memory limit costs this child, not the API. LAYOUT "" means none given.
"""

import sys
from pathlib import Path


def preload() -> None:
    """The imports main needs, done by a warm child before any upload arrives."""
    import numpy  # noqa: F401
    from PIL import Image

    Image.init()  # every format plug-in, imported now rather than on the first image of a kind

    import service.datasets.images  # noqa: F401
    import service.datasets.inspect  # noqa: F401


def inspect(argv: list[str]):
    from PIL import Image

    from service.datasets.inspect import inspect_dataset

    path, max_bytes, max_samples, max_image_pixels, layout = argv
    # Pillow's own guard (it refuses twice this many pixels while opening) agrees with ours; set
    # here, in the child of one upload, not in a process whose other users it would change.
    Image.MAX_IMAGE_PIXELS = int(max_image_pixels)
    return inspect_dataset(Path(path), max_bytes=int(max_bytes), max_samples=int(max_samples),
                           max_image_pixels=int(max_image_pixels), layout=layout or None)


def main(argv: list[str]) -> int:
    from service.sandbox import entry_main

    return entry_main(inspect, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
