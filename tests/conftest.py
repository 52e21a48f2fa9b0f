import os
import sys

# Tests must never try to download weights.
os.environ["HF_HUB_OFFLINE"] = "1"
# Make the flat repo (util/, main_*.py) importable when running plain `pytest`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A random tiny timm ViT teacher saved as a local weights file (nothing is downloaded in tests)."""
    import timm
    import torch
    from tiny import TINY_TEACHER

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_TEACHER).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from tiny import make_images
    return str(make_images(tmp_path_factory.mktemp("data")))
