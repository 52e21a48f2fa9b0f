"""Teacher weights from Hugging Face `transformers` files: CLIPVisionModel / CLIPModel and ViTModel (DINO),
.safetensors and .bin. Tiny random models made with transformers itself; our teacher's levels and [CLS]
attention must equal the transformers model's hidden states and attention on the same input."""
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny import register_open_clip_config

from maskalign.teacher_weights import build_teacher

CLIP_NAME = "maskalign-test-hf-clip"  # patch 16, width 64, 4 heads, 3 layers, 32 px: what tiny_hf_clip builds
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=16, hidden_act="quick_gelu", projection_dim=32)
VIT = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3, image_size=32,
           patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
TIMM_VIT = dict(depth=3, embed_dim=48, num_heads=3, img_size=32)


@pytest.fixture(scope="module", autouse=True)
def open_clip_config(tmp_path_factory):
    register_open_clip_config(tmp_path_factory.mktemp("hf_open_clip_config"), CLIP_NAME, embed_dim=32, image_size=32,
                              patch_size=16, width=64, head_width=16, layers=3)


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def save(model, folder, kind):
    """The file a user has: save_pretrained's model.safetensors (the hub's key names, which transformers
    5 writes from its own internal names), or the same tensors as an older pytorch_model.bin."""
    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    if kind == "safetensors":
        return str(path)
    torch.save(load_file(path), folder / "pytorch_model.bin")
    path.unlink()
    return str(folder / "pytorch_model.bin")


def tiny_hf_clip(full: bool):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(**VISION)
    if full:
        text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                           projection_dim=32)
        config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         projection_dim=32)
        model = transformers.CLIPModel(config)
    else:
        model = transformers.CLIPVisionModel(vision)
    return model.eval()


def hf_reference(vision_model, teacher, x):
    """transformers' hidden states (index i+1 = after block i) and last-block [CLS] attention to the patches,
    on the pixels our teacher feeds its own network (its normalisation applied)."""
    pixels = x * teacher.input_scale + teacher.input_shift
    vision_model.set_attn_implementation("eager")
    with torch.no_grad():
        out = vision_model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    return out.hidden_states, out.attentions[-1][:, :, 0, 1:].mean(dim=1)


def assert_matches(teacher, vision_model, depth):
    x = images()
    ours = teacher(x, list(range(depth)), need_cls_attention=True)
    hidden, attention = hf_reference(vision_model, teacher, x)
    for level in range(depth):
        torch.testing.assert_close(ours.levels[level], hidden[level + 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.cls_attention, attention, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("full,kind", [(False, "safetensors"), (True, "safetensors"), (False, "bin")])
def test_transformers_clip_file_gives_the_transformers_features(tmp_path, full, kind, caplog):
    model = tiny_hf_clip(full)
    path = save(model, tmp_path, kind)
    with caplog.at_level(logging.INFO):
        teacher = build_teacher(f"open_clip:{CLIP_NAME}", 32, 16, weights=path, force_quick_gelu=True)
    vision = model.vision_model if full else model
    assert_matches(teacher, vision, 3)
    # Our line comes last: open_clip's "initialized randomly" warning is not the final word on a loaded file.
    messages = [r.getMessage() for r in caplog.records]
    n = len(teacher.backbone.state_dict()) - 1  # every tensor of the image tower but the projection...
    expected = f"loaded teacher weights from {path} ({n + int(full)} tensors)"  # ...which only CLIPModel has
    assert messages[-1].startswith(expected), messages
    assert any("initialized randomly" in m for m in messages)  # open_clip did say it, before ours


def test_transformers_clip_file_into_a_timm_teacher(tmp_path):
    model = tiny_hf_clip(full=False)
    path = save(model, tmp_path, "safetensors")
    teacher = build_teacher("timm:vit_base_patch16_clip_quickgelu_224.openai", 32, 16, weights=path,
                            img_size=32, embed_dim=64, depth=3, num_heads=4)
    assert_matches(teacher, model, 3)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_transformers_vit_dino_file_gives_the_transformers_features(tmp_path, kind, caplog):
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=True).eval()
    path = save(model, tmp_path, kind)
    with caplog.at_level(logging.INFO):
        teacher = build_teacher("timm:vit_tiny_patch16_224", 32, 16, weights=path, **TIMM_VIT)
    assert_matches(teacher, model, 3)
    n = len(teacher.backbone.state_dict())
    assert caplog.records[-1].getMessage().startswith(f"loaded teacher weights from {path} ({n} tensors)")


def test_vit_for_image_classification_file_drops_the_classifier(tmp_path):
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT, num_labels=5)).eval()
    path = save(model, tmp_path, "safetensors")
    teacher = build_teacher("timm:vit_tiny_patch16_224", 32, 16, weights=path, **TIMM_VIT)
    assert_matches(teacher, model.vit, 3)


def test_transformers_vit_file_for_a_clip_teacher_says_what_to_use(tmp_path):
    torch.manual_seed(0)
    path = save(transformers.ViTModel(transformers.ViTConfig(**VIT)), tmp_path, "safetensors")
    with pytest.raises(ValueError, match="use a timm teacher"):
        build_teacher(f"open_clip:{CLIP_NAME}", 32, 16, weights=path)
