"""visualize.py: the pictures' files and content, with a CLIP teacher from a local file and with a pre-training
checkpoint; the tensorboard pictures of main_pretrain."""
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from tiny import pretrain_argv, register_open_clip_config

import main_pretrain
import visualize
from util import figures

CLIP = "maskalign-test-vis-clip"  # patch 16, 64 px: a 4x4 grid


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A random open_clip CLIP saved to a file: the teacher's real loading path, nothing downloaded."""
    folder = tmp_path_factory.mktemp("vis_clip")
    register_open_clip_config(folder, CLIP, image_size=64, patch_size=16, width=32, head_width=16, layers=2)
    torch.manual_seed(0)
    path = folder / "clip.pt"
    torch.save(open_clip.create_model(CLIP).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def bright_images(tmp_path_factory):
    """Images whose pixels are never MASK_FILL (all channels >= 128), so filled pixels can be counted."""
    folder = tmp_path_factory.mktemp("vis_images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(128, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def masked_share(path):
    pixels = np.asarray(Image.open(path))
    return (pixels == np.array(figures.MASK_FILL)).all(axis=-1).mean()


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_clip_teacher_from_a_local_file_masks_the_ratio_asked_for(tmp_path, clip_file, bright_images, ratio):
    written = visualize.main(["--teacher", f"open_clip:{CLIP}", "--teacher_weights", clip_file,
                              "--images", bright_images, "--input_size", "64", "--mask_ratio", str(ratio),
                              "--output_dir", str(tmp_path)])
    names = {os.path.basename(p) for p in written}
    assert names == {"overview.png"} | {f"mask_{kind}_{i}.png" for kind in ("attentive", "random") for i in range(3)}
    for i in range(3):
        for kind in ("attentive", "random"):
            path = tmp_path / f"mask_{kind}_{i}.png"
            assert Image.open(path).size == (64, 64)
            assert masked_share(path) == pytest.approx(ratio)  # 16 patches: 12 or 8 of them filled
    assert Image.open(tmp_path / "overview.png").size[0] > 400  # a readable figure, not a thumbnail


def test_attentive_mask_follows_the_teacher_attention():
    """With all the attention on 4 of 16 patches and 4 visible, the attentive mask shows exactly those."""
    attention = torch.full((2, 16), 1e-9)
    attention[:, [0, 5, 10, 15]] = 1.0
    masks = figures.sample_masks(attention, 0.75)
    attentive, random = masks["attentive"], masks["random"]
    assert torch.equal(attentive[0] == 0, attention[0] > 0.5)
    assert (random == 1).sum(dim=1).tolist() == [12, 12]


def test_mask_overlay_fills_exactly_the_dropped_patches():
    pixels = np.full((8, 8, 3), 200, dtype=np.uint8)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0])  # a 2x2 grid: top-left and bottom-right dropped
    out = figures.mask_overlay(pixels, mask)
    filled = (out == np.array(figures.MASK_FILL)).all(axis=-1)
    assert filled[:4, :4].all() and filled[4:, 4:].all() and not filled[:4, 4:].any() and not filled[4:, :4].any()


def test_alignment_figure_labels_values_and_targets():
    weight = torch.arange(12, dtype=torch.float32).view(3, 4) / 10
    fig = figures.alignment_figure(weight, [2, 3])
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in weight.flatten().tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["T0", "T1", "T2*", "T3*"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S0", "S1", "S2"]
    assert len(ax.patches) == 2  # one frame per target column
    figures._pyplot().close(fig)


def test_loss_figure_has_one_curve_per_level():
    records = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_loss_level0": 1.0, "train_loss_level1": 0.5,
                "train_loss_level2": 0.2} for e in range(3)]
    fig = figures.loss_figure(records)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["loss (mean of levels)", "target level 0", "target level 1", "target level 2"]
    figures._pyplot().close(fig)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, teacher_file, data_dir):
    out = tmp_path_factory.mktemp("vis_run")
    assert main_pretrain.run(pretrain_argv(data_dir, out, teacher_file, "--vis_freq", "1")) == 0
    return out


def test_checkpoint_gives_every_picture(tmp_path, pretrained, data_dir):
    written = visualize.main(["--checkpoint", str(pretrained / "checkpoint-latest.pth"), "--images", data_dir,
                              "--num_images", "2", "--output_dir", str(tmp_path)])
    names = {os.path.basename(p) for p in written}
    assert {"overview.png", "alignment_matrix.png", "loss_curves.png", "mask_attentive_1.png"} <= names
    assert masked_share(tmp_path / "mask_random_0.png") <= 1.0  # written at the checkpoint's 32 px
    assert Image.open(tmp_path / "mask_random_0.png").size == (32, 32)


def test_similarity_is_defined_on_visible_patches_only(pretrained, data_dir):
    model, args = visualize.load_model(str(pretrained / "checkpoint-latest.pth"))
    images, _ = figures.load_images(figures.image_files([data_dir], 2), args.input_size)
    attentive = figures.sample_masks(figures.teacher_attention(model.teacher, images), 0.5)["attentive"]
    similarity = figures.visible_similarity(model, images, attentive)
    assert torch.equal(torch.isnan(similarity), attentive == 1)
    visible = similarity[attentive == 0]
    assert ((visible >= -1.0 - 1e-6) & (visible <= 1.0 + 1e-6)).all()


def test_tensorboard_gets_a_readable_alignment_heatmap_and_the_masks(pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(pretrained), size_guidance={"images": 0})
    events.Reload()
    assert {"dynamic_alignment_matrix", "masks_and_attention"} <= set(events.Tags()["images"])
    heatmaps = events.Images("dynamic_alignment_matrix")
    assert len(heatmaps) == 2  # --vis_freq 1
    assert min(heatmaps[-1].width, heatmaps[-1].height) >= 200  # a labelled figure, not a 12x12 image
    assert len(events.Images("masks_and_attention")) == 2  # --vis_freq 1


def test_a_missing_teacher_file_is_one_line(tmp_path, pretrained, data_dir):
    ckpt = torch.load(pretrained / "checkpoint-latest.pth", weights_only=True)
    ckpt["args"]["teacher_weights"] = str(tmp_path / "moved.pth")
    torch.save(ckpt, tmp_path / "ckpt.pth")
    with pytest.raises(SystemExit, match="pass --teacher_weights FILE"):
        visualize.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--images", data_dir, "--output_dir",
                        str(tmp_path / "out")])
