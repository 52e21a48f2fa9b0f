"""Teachers on tiny random models: outputs against each library's own forward, loading, errors."""
import copy
import json
import socket
import time
import warnings

import huggingface_hub
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

import maskalign.teacher_weights as teacher_weights
import maskalign.teachers as teachers
from maskalign.teacher_weights import TeacherSpec, build_teacher, resolve_teacher_spec
from maskalign.teachers import IMAGENET_MEAN, IMAGENET_STD, OpenClipTeacher, TimmTeacher

TIMM_NAME = "vit_tiny_patch16_224"
TINY_TIMM = dict(depth=3, embed_dim=48, num_heads=3, img_size=32)
CLIP = "maskalign-test-vit"  # patch 16, width 64, 3 layers, 4 heads, 32 px
CLIP_QK = "maskalign-test-vit-qknorm"  # open_clip's custom Attention block (ln_q / ln_k)
CLIP_P8 = "maskalign-test-vit-p8"  # patch 8, 64 px: an 8x8 grid
CLIP_RN = "maskalign-test-rn"  # a ResNet image tower
TEXT_CFG = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)


@pytest.fixture(scope="session", autouse=True)
def clip_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    vision = {
        CLIP: dict(image_size=32, patch_size=16, width=64, head_width=16, layers=3),
        CLIP_QK: dict(image_size=32, patch_size=16, width=64, head_width=16, layers=2, qk_norm=True),
        CLIP_P8: dict(image_size=64, patch_size=8, width=32, head_width=16, layers=2),
        CLIP_RN: dict(image_size=32, layers=[1, 1, 1, 1], width=8),
    }
    for name, vision_cfg in vision.items():
        config = dict(embed_dim=32, vision_cfg=vision_cfg, text_cfg=TEXT_CFG)
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def raw_images(size=32, batch=2):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


def normalise(raw, mean, std):
    return (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def tiny_timm(**overrides):
    torch.manual_seed(0)
    return timm.create_model(TIMM_NAME, num_classes=0, **{**TINY_TIMM, **overrides}).eval()


def tiny_clip(name=CLIP, **kwargs):
    torch.manual_seed(0)
    return open_clip.create_model(name, **kwargs).eval()


def block_outputs(blocks, run):
    """Outputs of every block and the input of the last one, captured during `run()`."""
    outputs, last_input = [], []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in blocks]
    handles.append(blocks[-1].register_forward_pre_hook(lambda m, i: last_input.append(i[0])))
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return outputs, last_input[0]


def timm_reference(model, pixels):
    """timm's own forward; the full attention map of the last block taken from its unfused path."""
    maps = []
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    outputs, _ = block_outputs(model.blocks, lambda: model.forward_features(pixels))
    handle.remove()
    return outputs, maps[0]


def check_frozen(teacher, images):
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = nn.ModuleDict(dict(teacher=teacher, other=nn.Linear(2, 2)))
    parent.train()
    assert parent.other.training
    assert not any(m.training for m in teacher.modules())
    out = teacher(images.requires_grad_(), [0], need_cls_attention=True)
    assert not out.levels[0].requires_grad and not out.cls_attention.requires_grad


def check_cls_attention(attention, reference, num_patches):
    assert attention.shape == (reference.shape[0], num_patches)
    torch.testing.assert_close(attention, reference, atol=1e-5, rtol=1e-4)
    assert (attention > 0).all() and (attention.sum(-1) < 1).all()


# ----------------------------------------------------------------------------- timm

@pytest.mark.parametrize("variant", [{}, dict(qk_norm=True), dict(reg_tokens=2)], ids=["plain", "qk_norm", "reg"])
def test_timm_levels_and_cls_attention_match_timm_forward(variant):
    model = tiny_timm(**variant)
    teacher = TimmTeacher(copy.deepcopy(model), grid_size=2)
    raw = raw_images()
    out = teacher(normalise(raw, IMAGENET_MEAN, IMAGENET_STD), [0, 2], need_cls_attention=True)

    cfg = model.pretrained_cfg
    assert teacher.mean == tuple(cfg["mean"]) != IMAGENET_MEAN  # the conversion is exercised
    outputs, full_attention = timm_reference(model, normalise(raw, cfg["mean"], cfg["std"]))
    prefix = model.num_prefix_tokens
    assert sorted(out.levels) == [0, 2]
    for level in (0, 2):
        expected = torch.cat([outputs[level][:, :1], outputs[level][:, prefix:]], dim=1)
        assert out.levels[level].shape == (2, 5, 48)
        torch.testing.assert_close(out.levels[level], expected, atol=1e-5, rtol=1e-4)
    check_cls_attention(out.cls_attention, full_attention[:, :, 0, prefix:].mean(1), num_patches=4)


def test_timm_teacher_is_frozen():
    teacher = build_teacher(f"timm:{TIMM_NAME}", 32, 16, weights="random", **TINY_TIMM)
    check_frozen(teacher, raw_images())


def test_runs_only_the_blocks_it_needs():
    teacher = build_teacher(f"timm:{TIMM_NAME}", 32, 16, weights="none", **TINY_TIMM)
    calls = [0] * teacher.depth
    for i, block in enumerate(teacher.blocks):
        block.register_forward_hook(lambda m, inp, o, i=i: calls.__setitem__(i, calls[i] + 1))
    out = teacher(raw_images(), [0])
    assert calls == [1, 0, 0] and list(out.levels) == [0] and out.cls_attention is None
    teacher(raw_images(), [1], need_cls_attention=True)
    assert calls == [2, 1, 0]  # of the last block only its [CLS] attention row is computed


def test_timm_without_cls_token_reports_it():
    teacher = TimmTeacher(tiny_timm(class_token=False, global_pool="avg"), grid_size=2)
    assert not teacher.has_cls_token
    assert teacher(raw_images(), [1]).levels[1].shape == (2, 4, 48)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        teacher(raw_images(), [1], need_cls_attention=True)


def test_bf16_autocast_and_bf16_weights():
    teacher = build_teacher(f"timm:{TIMM_NAME}", 32, 16, weights="random", **TINY_TIMM)
    images = raw_images()
    reference = teacher(images, [2], need_cls_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = teacher(images, [2], need_cls_attention=True)
    assert mixed.cls_attention.dtype == torch.float32
    torch.testing.assert_close(mixed.cls_attention, reference.cls_attention, atol=2e-2, rtol=0)
    low = teacher.to(torch.bfloat16)(images, [2])
    assert low.levels[2].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- open_clip

@pytest.mark.parametrize("name", [CLIP, CLIP_QK])
def test_open_clip_levels_and_cls_attention_match_open_clip_forward(name):
    visual = tiny_clip(name).visual
    teacher = OpenClipTeacher(copy.deepcopy(visual), grid_size=2)
    raw = raw_images()
    out = teacher(normalise(raw, IMAGENET_MEAN, IMAGENET_STD), [0, 1], need_cls_attention=True)

    clip_pixels = normalise(raw, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    outputs, last_input = block_outputs(visual.transformer.resblocks, lambda: visual(clip_pixels))
    for level in (0, 1):
        assert out.levels[level].shape == (2, 5, 64)
        torch.testing.assert_close(out.levels[level], outputs[level], atol=1e-5, rtol=1e-4)
    check_cls_attention(out.cls_attention, full_open_clip_attention(visual, last_input)[:, :, 0, 1:].mean(1), 4)


def full_open_clip_attention(visual, block_input):
    """B x H x L x L attention probabilities of the last block, from the full q and k."""
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    with torch.no_grad():
        h = block.ln_1(block_input)
        q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k))
        if not isinstance(attn, nn.MultiheadAttention):
            q, k = attn.ln_q(q), attn.ln_k(k)
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)


def test_open_clip_blocks_compile_to_one_projection_gemm_each():
    """nn.MultiheadAttention's sequence-first in-projection compiles to a batched matmul with one small GEMM
    per token position; the teacher computes its blocks batch-first instead (issue #8)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ops = []

    def record(graph, _inputs):
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward)

    teacher = OpenClipTeacher(tiny_clip().visual, grid_size=2)
    images = raw_images()
    compiled = torch.compile(lambda x: teacher(x, [0, 1]).levels[1], backend=aot_autograd(fw_compiler=record),
                             fullgraph=True)
    try:
        torch.testing.assert_close(compiled(images), teacher(images, [0, 1]).levels[1])
    finally:
        torch._dynamo.reset()
    assert "aten.bmm.default" not in ops
    assert ops.count("aten.addmm.default") == 2 * 4  # per block: q/k/v projection, output projection, 2 MLP


def test_open_clip_mha_attention_matches_torch_need_weights():
    visual = tiny_clip().visual
    raw = raw_images()
    _, last_input = block_outputs(visual.transformer.resblocks, lambda: visual(raw))
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        h = block.ln_1(last_input)
        torch_map = block.attn(h, h, h, need_weights=True, average_attn_weights=True)[1]
    torch.testing.assert_close(full_open_clip_attention(visual, last_input).mean(1), torch_map,
                               atol=1e-6, rtol=1e-5)


def test_open_clip_teacher_is_frozen_and_keeps_only_the_image_tower():
    teacher = build_teacher(f"open_clip:{CLIP}", 32, 16, weights="random")
    assert isinstance(teacher, OpenClipTeacher)
    assert teacher.embed_dim == 64 and teacher.depth == 3 and teacher.patch_size == 16
    assert teacher.mean == open_clip.OPENAI_DATASET_MEAN and teacher.std == open_clip.OPENAI_DATASET_STD
    assert not any("token_embedding" in k for k in teacher.state_dict())
    check_frozen(teacher, raw_images())


# ----------------------------------------------------------------------------- weights files

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_round_trip_through_a_file(tmp_path, suffix):
    torch.manual_seed(1)
    model = timm.create_model(TIMM_NAME, **TINY_TIMM).eval()  # with a classifier head: it is ignored
    path = str(tmp_path / f"teacher{suffix}")
    save_file(model.state_dict(), path) if suffix == ".safetensors" else torch.save(model.state_dict(), path)
    loaded = build_teacher(f"timm:{TIMM_NAME}", 32, 16, weights=path, **TINY_TIMM)
    in_memory = TimmTeacher(model, grid_size=2)
    images = raw_images()
    a, b = (t(images, [0, 2], need_cls_attention=True) for t in (loaded, in_memory))
    for level in (0, 2):
        torch.testing.assert_close(a.levels[level], b.levels[level])
    torch.testing.assert_close(a.cls_attention, b.cls_attention)


def test_open_clip_round_trip_through_a_file(tmp_path):
    model = tiny_clip()
    path = str(tmp_path / "clip.pt")
    torch.save(model.state_dict(), path)
    loaded = build_teacher(f"open_clip:{CLIP}:{path}", 32, 16)
    in_memory = OpenClipTeacher(model.visual, grid_size=2)
    images = raw_images()
    a, b = (t(images, [2], need_cls_attention=True) for t in (loaded, in_memory))
    torch.testing.assert_close(a.levels[2], b.levels[2])
    torch.testing.assert_close(a.cls_attention, b.cls_attention)


def save_openai_style_archive(model, path):
    """A TorchScript archive like OpenAI's original ViT-B-16.pt: fp16, plus an int entry that is no weight."""
    model = copy.deepcopy(model)
    model.attn_mask = None  # open_clip's non-persistent buffer: tracing would store it
    model.register_buffer("input_resolution", torch.tensor(32))
    model.half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 32, 32, dtype=torch.half)},
                                        check_trace=False)
        torch.jit.save(traced, path)


def test_openai_torchscript_file_loads_into_both_libraries(tmp_path):
    model = tiny_clip(force_quick_gelu=True)
    path = str(tmp_path / "ViT-tiny.pt")
    save_openai_style_archive(model, path)
    reference = OpenClipTeacher(copy.deepcopy(model).half().float().visual, grid_size=2)
    expected = reference(raw_images(), [2]).levels[2]
    clip_teacher = build_teacher(f"open_clip:{CLIP}", 32, 16, weights=path, force_quick_gelu=True)
    torch.testing.assert_close(clip_teacher(raw_images(), [2]).levels[2], expected)
    # timm converts OpenAI's layout to its own; like open_clip, only its quickgelu names match OpenAI
    timm_teacher = build_teacher("timm:vit_base_patch16_clip_quickgelu_224.openai", 32, 16, weights=path,
                                 img_size=32, embed_dim=64, depth=3, num_heads=4)
    torch.testing.assert_close(timm_teacher(raw_images(), [2]).levels[2], expected, atol=1e-4, rtol=1e-4)


def test_mismatched_files_name_model_and_file(tmp_path):
    timm_path = str(tmp_path / "deeper.pth")
    torch.save(tiny_timm(depth=4).state_dict(), timm_path)
    with pytest.raises(ValueError, match=f"{timm_path}.*timm:{TIMM_NAME}"):
        build_teacher(f"timm:{TIMM_NAME}", 32, 16, weights=timm_path, **TINY_TIMM)
    clip_path = str(tmp_path / "other_clip.pt")
    torch.save(tiny_clip(CLIP_P8).state_dict(), clip_path)
    with pytest.raises(ValueError, match=f"{clip_path}.*open_clip:{CLIP}"):
        build_teacher(f"open_clip:{CLIP}", 32, 16, weights=clip_path)


def test_cached_hub_tag_works_offline_and_switches_on_quick_gelu(empty_hub_cache, monkeypatch):
    """An OpenAI-style tag: found in the HF cache while offline; its QuickGELU and mean/std are used."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    tag = dict(hf_hub="maskalign-test/tiny-clip/", quick_gelu=True, mean=mean, std=std)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, CLIP, dict(fakeopenai=tag))
    model = tiny_clip(force_quick_gelu=True)
    snapshot = empty_hub_cache / "models--maskalign-test--tiny-clip" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")

    teacher = build_teacher(f"open_clip:{CLIP}", 32, 16, weights="fakeopenai")
    assert isinstance(teacher.blocks[0].mlp.gelu, QuickGELU)
    assert teacher.mean == mean and teacher.std == std
    reference = OpenClipTeacher(model.visual, grid_size=2, mean=mean, std=std)
    torch.testing.assert_close(teacher(raw_images(), [2]).levels[2], reference(raw_images(), [2]).levels[2])


# ----------------------------------------------------------------------------- resizing to the student grid

def test_timm_patch14_teacher_is_resized_to_the_student_grid(monkeypatch):
    """CLIP-L/14 style: a 32 px / patch 16 student (2x2) gets a 28 px patch-14 teacher."""
    calls = []
    resample = teachers.resample_abs_pos_embed
    monkeypatch.setattr(teachers, "resample_abs_pos_embed", lambda *a, **k: calls.append(1) or resample(*a, **k))
    model = tiny_timm(patch_size=14, img_size=56, depth=2)  # native 4x4 grid
    teacher = TimmTeacher(copy.deepcopy(model), grid_size=2)
    assert teacher.image_size == 28 and teacher.patch_size == 14

    old = model.pos_embed.detach()
    grid = old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    expected_pos = torch.cat([old[:, :1], grid], dim=1)
    torch.testing.assert_close(teacher.backbone.pos_embed, expected_pos)

    raw = raw_images()
    out = teacher(normalise(raw, IMAGENET_MEAN, IMAGENET_STD), [1])
    teacher(raw, [1])
    assert len(calls) == 1  # resampled at construction, never per call
    assert out.levels[1].shape == (2, 5, 48)

    reference = tiny_timm(patch_size=14, img_size=28, depth=2)
    reference.load_state_dict({**model.state_dict(), "pos_embed": expected_pos})
    pixels = F.interpolate(normalise(raw, *(model.pretrained_cfg[k] for k in ("mean", "std"))),
                           size=(28, 28), mode="bicubic", align_corners=False)
    outputs, _ = block_outputs(reference.blocks, lambda: reference.forward_features(pixels))
    torch.testing.assert_close(out.levels[1], outputs[1], atol=1e-5, rtol=1e-4)


def test_open_clip_patch8_teacher_is_resized_to_the_student_grid():
    """A 64 px / patch 16 student (4x4) gets a 32 px patch-8 teacher, its 8x8 position grid resampled."""
    teacher = build_teacher(f"open_clip:{CLIP_P8}", 64, 16, weights="random")
    assert teacher.image_size == 32 and teacher.grid_size == 4
    assert teacher.backbone.positional_embedding.shape == (17, 32)
    out = teacher(raw_images(64), [1], need_cls_attention=True)
    assert out.levels[1].shape == (2, 17, 32) and out.cls_attention.shape == (2, 16)


# ----------------------------------------------------------------------------- specs and aliases

def test_aliases_resolve_to_quick_gelu_models():
    openai_b16 = TeacherSpec("open_clip", "ViT-B-16-quickgelu", "openai")
    assert resolve_teacher_spec("openai/clip-vit-base-patch16") == openai_b16
    assert resolve_teacher_spec("clip_b16") == openai_b16
    assert resolve_teacher_spec("openai/clip-vit-large-patch14") == TeacherSpec("open_clip", "ViT-L-14-quickgelu",
                                                                                "openai")
    assert resolve_teacher_spec("facebook/dino-vitb16") == TeacherSpec("timm", "vit_base_patch16_224.dino", None)
    # a local file replaces the hub weights but keeps the QuickGELU architecture
    assert resolve_teacher_spec("clip_l14", "/w/l14.bin") == TeacherSpec("open_clip", "ViT-L-14-quickgelu",
                                                                         "/w/l14.bin")
    assert resolve_teacher_spec("open_clip:ViT-B-16:laion2b_s34b_b88k").weights == "laion2b_s34b_b88k"
    assert resolve_teacher_spec("timm:vit_small_patch16_224", "None").weights == "random"


def test_openai_alias_builds_a_quick_gelu_vit_b16():
    teacher = build_teacher("openai/clip-vit-base-patch16", 224, 16, weights="random")
    assert isinstance(teacher.blocks[0].mlp.gelu, QuickGELU)
    assert (teacher.depth, teacher.embed_dim, teacher.image_size) == (12, 768, 224)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("spec", ["vit_base", "hf:facebook/dino-vitb16", "openai/clip-vit-huge-patch14", "timm:"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError, match="unknown teacher.*open_clip:<model>.*clip_b16"):
        build_teacher(spec, 224, 16)


@pytest.mark.parametrize("spec, message", [
    ("open_clip:ViT-Nope-16", "unknown open_clip model"),
    ("timm:vit_nope_patch16_224", "unknown timm model"),
    ("timm:vit_tiny_patch16_224.nope", "unknown pretrained tag"),
])
def test_unknown_model(spec, message):
    with pytest.raises(ValueError, match=message):
        build_teacher(spec, 224, 16, weights="random")


@pytest.mark.parametrize("spec, kwargs", [("timm:resnet18", {}), (f"open_clip:{CLIP_RN}", {})])
def test_non_vit_teacher(spec, kwargs):
    with pytest.raises(ValueError, match="not a ViT|not open_clip's VisionTransformer"):
        build_teacher(spec, 32, 16, weights="random", **kwargs)


def test_non_square_patches_cannot_match_the_grid():
    with pytest.raises(ValueError, match="non-square patches"):
        TimmTeacher(tiny_timm(patch_size=(16, 8)), grid_size=2)


@pytest.mark.parametrize("img_size, patch_size", [(30, 16), (224, 0)])
def test_student_size_not_divisible(img_size, patch_size):
    with pytest.raises(ValueError, match="not divisible"):
        build_teacher(f"timm:{TIMM_NAME}", img_size, patch_size, weights="random", **TINY_TIMM)


@pytest.fixture
def online(monkeypatch):
    """Pretend the hub is reachable; each test provides its own hf_hub_download."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(teacher_weights, "hub_reachable", lambda: True)


@pytest.fixture
def connections(monkeypatch):
    """No network, whatever this machine has: every TCP connection attempt is recorded and refused."""
    attempts = []

    def refuse(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize("spec, weights", [("open_clip:ViT-B-16", "openai"), ("facebook/dino-vitb16", None)])
def test_unreachable_hub_fails_fast_with_the_advice(empty_hub_cache, monkeypatch, connections, spec, weights):
    """Without HF_HUB_OFFLINE a machine with no internet took 28 s of retries, printing every warning twice
    (issue 11, item 14): one connection attempt with a short timeout now decides, before any download."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(ValueError, match=r"cannot be reached from this machine.*--teacher_weights PATH.*HF_HUB_OFF"):
        build_teacher(spec, 224, 16, weights=weights)
    host = huggingface_hub.constants.ENDPOINT.split("://")[1].split("/")[0]
    timeout = teacher_weights.HUB_CONNECT_TIMEOUT_S
    assert connections == [((host, 443), timeout)] and timeout <= 5


def test_hub_reachability_goes_through_the_https_proxy(monkeypatch, connections):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    assert teacher_weights.hub_reachable() is False
    assert connections[-1][0] == ("proxy.example.org", 3128)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: open(__file__))
    assert teacher_weights.hub_reachable() is True


@pytest.mark.parametrize("spec, weights", [("open_clip:ViT-B-16", "openai"), ("facebook/dino-vitb16", None)])
def test_offline_hub_weights_fail_fast(empty_hub_cache, monkeypatch, spec, weights):
    # HF_HUB_OFFLINE set after huggingface_hub was imported must still keep us off the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("network touched"))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not in the Hugging Face cache.*--teacher_weights"):
        build_teacher(spec, 224, 16, weights=weights)
    assert time.perf_counter() - start < 5


def test_failed_download_asks_for_a_local_file(empty_hub_cache, online, monkeypatch):
    def no_connection(repo_id, filename):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_connection)
    with pytest.raises(ValueError, match="cannot download.*--teacher_weights") as error:
        build_teacher(f"timm:{TIMM_NAME}", 32, 16, **TINY_TIMM)
    assert isinstance(error.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


def test_timm_hub_weights_are_downloaded_then_loaded(empty_hub_cache, online, monkeypatch, tmp_path):
    model = tiny_timm()
    path = str(tmp_path / "model.safetensors")
    save_file(model.state_dict(), path)
    requests = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: requests.append(
        (repo_id, filename)) or path)
    teacher = build_teacher(f"timm:{TIMM_NAME}", 32, 16, **TINY_TIMM)
    assert requests == [(model.pretrained_cfg["hf_hub_id"], "model.safetensors")]
    reference = TimmTeacher(model, grid_size=2)
    torch.testing.assert_close(teacher(raw_images(), [1]).levels[1], reference(raw_images(), [1]).levels[1])


@pytest.mark.parametrize("spec, weights, message", [
    (f"open_clip:{CLIP}", None, "needs weights"),
    (f"open_clip:{CLIP}", "not_a_tag", "neither a pretrained tag"),
    (f"timm:{TIMM_NAME}", "/no/such/file.pth", "does not exist"),
])
def test_bad_weights(spec, weights, message):
    with pytest.raises(ValueError, match=message):
        build_teacher(spec, 32, 16, weights=weights)


def test_bad_levels():
    teacher = build_teacher(f"timm:{TIMM_NAME}", 32, 16, weights="random", **TINY_TIMM)
    with pytest.raises(ValueError, match="levels \\[3\\] do not exist"):
        teacher(raw_images(), [0, 3])
    with pytest.raises(ValueError, match="at least one level"):
        teacher(raw_images(), [])


# ----------------------------------------------------------------------------- last block on visible tokens

VISIBLE = torch.tensor([[5, 0, 11, 14, 2], [9, 3, 15, 7, 1]])  # a 4 x 4 grid, 5 patches kept


def visible_teachers():
    yield "timm", TimmTeacher(tiny_timm(img_size=64), grid_size=4)
    yield "timm-qk_norm", TimmTeacher(tiny_timm(img_size=64, qk_norm=True), grid_size=4)
    yield "timm-reg", TimmTeacher(tiny_timm(img_size=64, reg_tokens=2), grid_size=4)
    yield "open_clip", OpenClipTeacher(tiny_clip().visual, grid_size=4)
    yield "open_clip-qk_norm", OpenClipTeacher(tiny_clip(CLIP_QK).visual, grid_size=4)


@pytest.mark.parametrize("kind", ["timm", "timm-qk_norm", "timm-reg", "open_clip", "open_clip-qk_norm"])
def test_last_block_on_visible_tokens_equals_the_full_block(kind):
    """Queries, attention output and MLP of the final block only for [CLS] + the chosen patches (keys and values
    from every token): the same rows as the full block, and the [CLS] attention the choice was made from."""
    teacher = dict(visible_teachers())[kind]
    images = raw_images(64)
    last = teacher.depth - 1
    full = teacher(images, [0, last], need_cls_attention=True)
    seen = []
    part = teacher(images, [0, last], need_cls_attention=True, choose_visible=lambda a: seen.append(a) or VISIBLE)
    assert part.visible_levels == {last} and part.ids_keep is VISIBLE
    torch.testing.assert_close(seen[0], full.cls_attention, rtol=0, atol=0)
    expected = torch.cat([full.levels[last][:, :1], torch.stack([full.levels[last][b, 1:][VISIBLE[b]]
                                                                 for b in range(2)])], dim=1)
    assert part.levels[last].shape == (2, 6, teacher.embed_dim)
    torch.testing.assert_close(part.levels[last], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.levels[0], full.levels[0], rtol=0, atol=0)


def test_every_patch_visible_or_visible_only_off_runs_the_full_block():
    teacher = TimmTeacher(tiny_timm(img_size=64), grid_size=4)
    images = raw_images(64)
    all_patches = torch.arange(16).expand(2, -1)
    for out in (teacher(images, [2], choose_visible=lambda a: all_patches),
                teacher(images, [2], choose_visible=lambda a: VISIBLE, visible_only=False)):
        assert out.visible_levels == frozenset() and out.levels[2].shape == (2, 17, 48)


@pytest.mark.parametrize("make", [lambda: TimmTeacher(tiny_timm(), grid_size=2),
                                  lambda: OpenClipTeacher(tiny_clip().visual, grid_size=2)], ids=["timm", "open_clip"])
def test_weights_kept_in_bf16_compute_what_autocast_computes(make):
    """The frozen weights cast once (set_compute_dtype) give the numbers an autocast of float32 weights gives."""
    images = raw_images()
    reference = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(images, [1, 2] if reference.depth > 2 else [1], need_cls_attention=True)
    kept = make().set_compute_dtype(torch.bfloat16)
    linear_dtypes = {m.weight.dtype for m in kept.modules() if isinstance(m, nn.Linear)}
    assert linear_dtypes == {torch.bfloat16}
    got = kept(images, list(expected.levels), need_cls_attention=True)  # no outer autocast needed
    for level, value in expected.levels.items():
        torch.testing.assert_close(got.levels[level], value, rtol=0, atol=0)
    torch.testing.assert_close(got.cls_attention, expected.cls_attention, rtol=0, atol=0)
