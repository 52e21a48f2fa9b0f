"""Real photos with no download: the JPEG/PNG files scikit-image ships inside its package, for the data
benchmark's ImageNet-like set and for the tests of the decode paths."""
import os


def shipped_photos() -> list[str]:
    import skimage  # a benchmark and test dependency only
    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    names = sorted(n for n in os.listdir(data_dir) if n.lower().endswith((".png", ".jpg")))
    return [os.path.join(data_dir, n) for n in names]
