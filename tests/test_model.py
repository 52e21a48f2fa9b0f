"""MaskAlign core: student, masking, Dynamic Alignment, targets, loss, API and validation (issue #2)."""
import itertools

import pytest
import timm
import torch

import models_maskalign
from maskalign.alignment import DynamicAlignment, init_alignment_matrix, relative_depth_map
from maskalign.masking import attentive_visible, mask_from_visible, num_visible, random_visible
from maskalign.teacher_weights import build_teacher
from models_maskalign import MaskAlignConfig, MaskAlignViT, create_maskalign
from util.optim import param_groups_weight_decay

IMG = 32  # 2 x 2 patch grid with patch 16
TINY_STUDENT = dict(img_size=IMG, embed_dim=32, depth=2, num_heads=2)


def tiny_teacher(img_size=IMG, depth=3, **kwargs):
    return build_teacher("timm:vit_tiny_patch16_224", img_size, 16, weights="none",
                         depth=depth, embed_dim=48, num_heads=3, img_size=img_size, **kwargs)


def tiny_model(teacher=None, **kwargs):
    torch.manual_seed(0)
    kwargs = {**TINY_STUDENT, "top_k": 2, **kwargs}
    return create_maskalign("tiny", teacher=teacher or tiny_teacher(), **kwargs)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return tiny_teacher(img_size=64)


@pytest.fixture
def imgs():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- shapes for every option combination
OPTION_GRID = list(itertools.product(("dynamic", "official", "layerwise"), ("linear", "mlp"),
                                     ("ln", "bn", "l2", "none"), ("smooth_l1", "l1", "l2"), (True, False),
                                     ("random", "attentive")))


@pytest.mark.parametrize("align,adaptor,target_norm,loss_type,align_cls,mask_type", OPTION_GRID)
def test_shapes_for_every_option(teacher, imgs, align, adaptor, target_norm, loss_type, align_cls, mask_type):
    model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=32, depth=2, num_heads=2, top_k=2,
                             align=align, adaptor=adaptor, target_norm=target_norm, loss_type=loss_type,
                             align_cls=align_cls, mask_type=mask_type, mask_ratio=0.75)
    loss, pred, mask, level_losses = model(imgs, return_level_losses=True)
    n_visible = 16 - 12
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, 4, n_visible + int(align_cls), 48)
    assert mask.shape == (4, 16) and (mask.sum(1) == 12).all()
    assert level_losses.shape == (2,)
    torch.testing.assert_close(loss, level_losses.mean())


def test_student_deeper_than_teacher(imgs):
    model = create_maskalign("tiny", teacher=tiny_teacher(64, depth=2), img_size=64, embed_dim=32, depth=4,
                             num_heads=2, top_k=2)
    loss, pred, _ = model(imgs)
    assert pred.shape[0] == 2 and torch.isfinite(loss)


# ---------------------------------------------------------------- masking
def test_num_visible_matches_mae():
    assert num_visible(196, 0.7) == 58 and num_visible(196, 0.75) == 49 and num_visible(196, 0.0) == 196


@pytest.mark.parametrize("sampler", ["random", "attentive"])
def test_masking_count_and_uniqueness(sampler):
    g = torch.Generator().manual_seed(0)
    for len_keep in (1, 5, 59, 196):
        if sampler == "random":
            ids = random_visible(8, 196, len_keep, torch.device("cpu"), generator=g)
        else:
            ids = attentive_visible(torch.rand(8, 196, generator=g), len_keep, generator=g)
        assert ids.shape == (8, len_keep)
        assert all(len(set(row.tolist())) == len_keep for row in ids)
        assert ids.min() >= 0 and ids.max() < 196
        mask = mask_from_visible(ids, 196)
        assert (mask.sum(1) == 196 - len_keep).all()
        assert (mask.gather(1, ids) == 0).all()


def test_attentive_masking_prefers_high_attention():
    g = torch.Generator().manual_seed(0)
    importance = torch.ones(2000, 16)
    importance[:, :4] = 10.0  # four patches with 10x the attention
    ids = attentive_visible(importance, 4, generator=g)
    share_high = (ids < 4).float().mean().item()
    # Under proportional sampling without replacement the hot patches win far more than their 25% share.
    assert share_high > 0.6
    # and the distribution equals torch.multinomial's (the reference code's sampler)
    ref = torch.multinomial(importance, 16, replacement=False, generator=g)[:, :4]
    assert abs(share_high - (ref < 4).float().mean().item()) < 0.03


def test_attentive_masking_handles_zero_attention():
    importance = torch.zeros(3, 10)
    importance[:, 0] = 1.0
    ids = attentive_visible(importance, 6)
    assert all(len(set(r.tolist())) == 6 and 0 in r.tolist() for r in ids)


def test_mask_ratio_zero_keeps_every_patch(teacher, imgs):
    for mask_type in ("random", "attentive"):
        model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=32, depth=2, num_heads=2,
                                 top_k=2, mask_type=mask_type)
        _, pred, mask = model(imgs, mask_ratio=0.0)
        assert mask.sum() == 0 and pred.shape[2] == 17


def test_explicit_visible_indices(teacher, imgs):
    model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=32, depth=2, num_heads=2, top_k=2)
    ids_keep = torch.tensor([[0, 5, 10, 15]] * 4)
    loss_a, _, mask = model(imgs, ids_keep=ids_keep)
    loss_b, _, _ = model(imgs, ids_keep=ids_keep)
    assert torch.equal(loss_a, loss_b)  # no randomness left once the visible set is fixed
    assert mask[0].tolist() == [0 if i in (0, 5, 10, 15) else 1 for i in range(16)]


# ---------------------------------------------------------------- loss by hand
def test_loss_equals_hand_computation(teacher, imgs):
    model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=32, depth=2, num_heads=2, top_k=2,
                             drop_path_rate=0.0).eval()
    with torch.no_grad():
        model.dynamic_align.weight.normal_()
    ids_keep = torch.tensor([[3, 7, 1, 12]] * 4)
    loss, _, _, level_losses = model(imgs, ids_keep=ids_keep, return_level_losses=True)

    # student by hand: patchify, add pos, gather, prepend [CLS], run blocks
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    x = torch.stack([x[b, ids_keep[b]] for b in range(4)])
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(4, -1, -1), x], 1)
    feats = []
    for blk in model.blocks:
        x = blk(x)
        feats.append(x)
    # teacher by hand: last two blocks of a depth-3 teacher
    t_out = teacher(imgs, [1, 2])
    expected = []
    for k, j in enumerate((1, 2)):
        yhat = sum(model.dynamic_align.weight[i, j] * model.dynamic_align.adaptors[i](feats[i]) for i in range(2))
        y = t_out.levels[j]
        y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
        y = torch.cat([y[:, :1], torch.stack([y[b, 1:][ids_keep[b]] for b in range(4)])], 1)
        d = (yhat - y).abs()
        expected.append(torch.where(d <= 1, 0.5 * d ** 2, d - 0.5).mean())
    torch.testing.assert_close(level_losses, torch.stack(expected))
    torch.testing.assert_close(loss, (expected[0] + expected[1]) / 2)


def test_layerwise_equals_dynamic_with_identity_matrix():
    torch.manual_seed(0)
    feats = [torch.randn(2, 5, 16) for _ in range(4)]
    dynamic = DynamicAlignment(16, 24, 4, 4, [2, 3], form="dynamic")
    layerwise = DynamicAlignment(16, 24, 4, 4, [2, 3], form="layerwise")
    with torch.no_grad():
        dynamic.weight.copy_(torch.eye(4))
        for k, j in enumerate((2, 3)):
            layerwise.adaptors[k].load_state_dict(dynamic.adaptors[j].state_dict())
    torch.testing.assert_close(dynamic(feats), layerwise(feats))


def test_official_form_mixes_then_adapts():
    torch.manual_seed(0)
    feats = [torch.randn(2, 5, 16) for _ in range(3)]
    da = DynamicAlignment(16, 24, 3, 3, [2], form="official")
    mixed = sum(da.weight[i, 2] * feats[i] for i in range(3))
    torch.testing.assert_close(da(feats)[0], da.adaptors[0](mixed))


def test_alignment_matrix_init_relative_depth():
    torch.testing.assert_close(init_alignment_matrix(3, 3), torch.eye(3) + 0.01)
    assert relative_depth_map(12, 24)[0] == 1 and relative_depth_map(12, 24)[-1] == 23
    assert relative_depth_map(24, 12) == [i // 2 for i in range(24)]
    assert relative_depth_map(12, 12) == list(range(12))
    w = init_alignment_matrix(4, 2)
    assert (w.argmax(1) == torch.tensor([0, 0, 1, 1])).all()


def test_only_target_levels_computed():
    da = DynamicAlignment(16, 24, 4, 6, [4, 5], form="official")
    assert len(da.adaptors) == 2
    da = DynamicAlignment(16, 24, 4, 6, [5], form="layerwise")
    assert len(da.adaptors) == 1 and da.source_blocks == [3]


# ---------------------------------------------------------------- gradients and the teacher
@pytest.mark.parametrize("align", ["dynamic", "official", "layerwise"])
def test_gradients_reach_alignment_never_teacher(teacher, imgs, align):
    model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=32, depth=2, num_heads=2,
                             top_k=2, align=align)
    model(imgs)[0].backward()
    if align != "layerwise":
        assert model.dynamic_align.weight.grad is not None and model.dynamic_align.weight.grad.abs().sum() > 0
    for adaptor in model.dynamic_align.adaptors:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adaptor.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # no unused params for DDP


def test_teacher_outside_module_tree(teacher):
    model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=32, depth=2, num_heads=2, top_k=2)
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert not any(k.startswith(("teacher", "_teacher")) for k in model.state_dict())
    model.train()
    assert not teacher.training
    model.double()
    assert next(teacher.parameters()).dtype == torch.float64
    model.float()


def test_param_groups():
    model = tiny_model()
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "dynamic_align.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert "pos_embed" not in no_decay_names and "norm.weight" not in no_decay_names  # frozen: not optimised
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


# ---------------------------------------------------------------- timm interop
def test_student_loads_strictly_into_timm():
    t = tiny_teacher(224, depth=2)
    model = models_maskalign.maskalign_vit_tiny_patch16(teacher=t, top_k=2).eval()
    assert model.student_arch == "vit_tiny_patch16_224"
    vit = timm.create_model(model.student_arch, pretrained=False, num_classes=0).eval()
    vit.load_state_dict(model.student_state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model.norm(model.forward_visible(x, None)[-1])
        torch.testing.assert_close(vit.forward_features(x), ours)
    assert not any(k.startswith("dynamic_align") for k in model.student_state_dict())


def test_registered_with_timm():
    assert {"maskalign_vit_tiny_patch16", "maskalign_vit_base_patch16", "maskalign_vit_large_patch16",
            "maskalign_vit_small_patch16"} <= set(timm.list_models("maskalign*"))
    model = timm.create_model("maskalign_vit_tiny_patch16", teacher=tiny_teacher(), top_k=2, **TINY_STUDENT)
    assert isinstance(model, MaskAlignViT)
    # MAE's engine builds models as models_mae.__dict__[name](norm_pix_loss=..., drop_path_rate=...)
    model = models_maskalign.__dict__["maskalign_vit_tiny"](teacher=tiny_teacher(), top_k=2, norm_pix_loss=False,
                                                            drop_path_rate=0.1, **TINY_STUDENT)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


def test_fixed_sincos_position_embedding():
    model = tiny_model()
    assert not model.pos_embed.requires_grad
    assert torch.all(model.pos_embed[0, 0] == 0)
    assert model.pos_embed[0, 1:].abs().max() <= 1.0
    assert not torch.allclose(model.pos_embed[0, 1], model.pos_embed[0, 2])


def test_resized_teacher_patch_14():
    """CLIP-L/14-style: a patch-14 teacher sees 28 px so its 2x2 grid matches a 32 px / 16 px student."""
    t = build_teacher("timm:vit_tiny_patch16_224", IMG, 16, weights="none", patch_size=14, depth=2,
                      embed_dim=48, num_heads=3, img_size=224)
    assert t.image_size == 28
    model = tiny_model(teacher=t)
    loss, pred, mask = model(torch.randn(2, 3, IMG, IMG))
    assert torch.isfinite(loss) and mask.shape == (2, 4)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(top_k=4), "top_k=4 exceeds"),
    (dict(top_k=0), "top_k"),
    (dict(align="foo"), "align must be one of"),
    (dict(target_norm="whiten"), "target_norm must be one of"),
    (dict(loss_type="huber"), "loss_type must be one of"),
    (dict(mask_type="block"), "mask_type must be one of"),
    (dict(adaptor="conv"), "adaptor must be one of"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)


def test_bad_mask_ratio_at_call_time():
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_model()(torch.randn(1, 3, IMG, IMG), mask_ratio=1.0)


def test_unknown_teacher():
    with pytest.raises(ValueError, match="teacher"):
        create_maskalign("tiny", teacher="no_such_teacher", **TINY_STUDENT)


def test_grid_that_cannot_match():
    with pytest.raises(ValueError, match="grid"):
        tiny_model(teacher=tiny_teacher(64))  # teacher built for 64 px, student at 32 px
    with pytest.raises(ValueError, match="multiple of the patch size"):
        create_maskalign("tiny", teacher=tiny_teacher(), img_size=40, embed_dim=32, depth=2, num_heads=2)


def test_teacher_without_cls_token():
    no_cls = tiny_teacher(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="attentive masking needs a teacher with a \\[CLS\\]"):
        tiny_model(teacher=no_cls)
    with pytest.raises(ValueError, match="align_cls=False"):
        tiny_model(teacher=no_cls, mask_type="random")
    model = tiny_model(teacher=no_cls, mask_type="random", align_cls=False)
    assert model(torch.randn(2, 3, IMG, IMG))[1].shape == (2, 2, 1, 48)


def test_config_defaults_follow_paper():
    c = MaskAlignConfig()
    assert (c.mask_type, c.mask_ratio, c.top_k, c.align, c.adaptor, c.target_norm, c.loss_type, c.align_cls) == \
        ("attentive", 0.7, 5, "dynamic", "linear", "ln", "smooth_l1", True)


# ---------------------------------------------------------------- it learns
def test_pretraining_lowers_loss_on_fixed_batch(teacher, imgs):
    torch.manual_seed(0)
    model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=64, depth=2, num_heads=2, top_k=2)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    ids_keep = random_visible(4, 16, 5, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(imgs, ids_keep=ids_keep)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("target_norm", ["ln", "bn"])
def test_targets_from_the_visible_last_block_equal_the_full_computation(teacher, imgs, target_norm):
    """The teacher's last block runs only at [CLS] + the visible patches; the targets are those of the full pass."""
    model = create_maskalign("tiny", teacher=teacher, img_size=64, embed_dim=32, depth=2, num_heads=2, top_k=2,
                             target_norm=target_norm)
    ids_keep = torch.tensor([[3, 7, 1, 12]] * 4)
    visible = teacher(imgs, model.target_levels, choose_visible=lambda a: ids_keep,
                      visible_only=target_norm != "bn")
    assert visible.visible_levels == ({2} if target_norm == "ln" else frozenset())
    full = teacher(imgs, model.target_levels)
    torch.testing.assert_close(model.targets(visible.levels, ids_keep, visible.visible_levels),
                               model.targets(full.levels, ids_keep), rtol=1e-5, atol=1e-5)
