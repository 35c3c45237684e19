"""How a zip of image files reads as a dataset (used at upload and when a job decodes it): an
ImageFolder layout (one folder per class, labels in sorted class-name order) or a flat, unlabelled
set. Hidden files and __MACOSX entries are ignored."""

from pathlib import PurePosixPath

from modelpress.spec.errors import EngineError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _ignored(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts)


def image_entries(names: list[str]) -> tuple[list[str], list[str] | None, list[int] | None]:
    """Image paths, class names and labels (None for an unlabelled zip)."""
    files = sorted(n for n in names if not _ignored(n))
    others = [n for n in files if PurePosixPath(n).suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise EngineError("invalid_dataset", f"the zip holds files that are not images (JPEG, PNG, BMP, WebP), e.g. {others[0]!r}")
    if not files:
        raise EngineError("invalid_dataset", "the zip holds no images")
    parts = [PurePosixPath(n).parts for n in files]
    # One folder wrapping everything ("dataset/cat/1.png") is not a class level.
    while all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    depths = {len(p) for p in parts}
    if depths == {1}:
        return files, None, None
    if depths != {2}:
        raise EngineError("invalid_dataset", "use one folder per class with the images directly inside (ImageFolder), or no folders at all")
    classes = sorted({p[0] for p in parts})
    return files, classes, [classes.index(p[0]) for p in parts]
