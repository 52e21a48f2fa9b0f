"""The repo's form, pinned: masking as a registry, one source for each default, presets that are recipes, the
shared parser (no abbreviations) in every entry point, and stop signals configured by argument."""
import signal
from dataclasses import fields

import pytest
import torch

import demo
import export_timm
import main_finetune
import main_pretrain
import make_shards
import models_maskalign
import submitit_launch
import visualize
from maskalign import masking
from maskalign.masking import Masking, MaskingRequest
from maskalign.teacher_weights import build_teacher
from models_maskalign import DEFAULT_TEACHER, MaskAlignConfig, create_maskalign
from util import figures
from util.args import HelpFormatter
from util.recipes import RECIPES

ENTRY_POINT_PARSERS = {
    "main_pretrain.py": main_pretrain.get_args_parser, "main_finetune.py": main_finetune.get_args_parser,
    "submitit_launch.py": submitit_launch.get_args_parser, "export_timm.py": export_timm.get_args_parser,
    "make_shards.py": make_shards.get_args_parser, "visualize.py": visualize.get_args_parser,
    "demo.py": demo.get_args_parser,
}


@pytest.fixture
def strided_masking(monkeypatch):
    """A new strategy, registered the documented way: one function and one entry. It asks for the [CLS]
    attention so that the test sees the model compute it for a strategy that is not `attentive`."""
    seen = []

    def every_other_patch(request: MaskingRequest) -> torch.Tensor:
        seen.append(request.cls_attention)
        ids = torch.arange(0, request.num_patches, 2, device=request.device)[:request.len_keep]
        return ids.expand(request.batch_size, -1)

    monkeypatch.setitem(masking.MASKINGS, "strided", Masking(every_other_patch, needs_cls_attention=True))
    return seen


def tiny_teacher(**kwargs):
    return build_teacher("timm:vit_tiny_patch16_224", 64, 16, weights="none", depth=2, embed_dim=48, num_heads=3,
                         img_size=64, **kwargs)


def test_a_registered_masking_strategy_reaches_the_model_the_checks_and_the_pictures(strided_masking):
    model = create_maskalign("tiny", teacher=tiny_teacher(), img_size=64, embed_dim=32, depth=2, num_heads=2,
                             top_k=2, mask_type="strided", mask_ratio=0.5)
    _, _, mask = model(torch.randn(3, 3, 64, 64))
    assert mask[0].tolist() == [0.0, 1.0] * 8  # patches 0, 2, 4, ... visible
    assert strided_masking and strided_masking[-1].shape == (3, 16)  # the teacher's attention was computed for it
    with pytest.raises(ValueError, match="strided masking needs a teacher with a \\[CLS\\] token"):
        create_maskalign("tiny", teacher=tiny_teacher(class_token=False, global_pool="avg"), img_size=64,
                         embed_dim=32, depth=2, num_heads=2, top_k=2, mask_type="strided", align_cls=False)
    masks = figures.sample_masks(torch.rand(2, 16), 0.5)
    assert set(masks) == {"attentive", "random", "strided"} and masks["strided"][1].tolist() == [0.0, 1.0] * 8
    args = main_pretrain.parse_args(["--device", "cpu", "--mask_type", "strided"])
    assert args.mask_type == "strided"


def test_an_unregistered_strategy_is_refused_everywhere():
    with pytest.raises(ValueError, match="mask_type must be one of"):
        MaskAlignConfig(mask_type="strided")
    with pytest.raises(SystemExit) as exc:
        main_pretrain.parse_args(["--device", "cpu", "--mask_type", "strided"])
    assert exc.value.code == 2


def test_the_cli_defaults_are_the_model_config_and_the_paper_recipe(capsys):
    args = main_pretrain.parse_args(["--device", "cpu"])
    paper = MaskAlignConfig()
    assert {f.name: getattr(args, f.name) for f in fields(MaskAlignConfig)} == \
        {f.name: getattr(paper, f.name) for f in fields(MaskAlignConfig)}
    assert args.teacher == DEFAULT_TEACHER == RECIPES["pretrain_b16_paper"].flags["teacher"]
    with pytest.raises(SystemExit):
        main_pretrain.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, value in (("--mask_ratio", paper.mask_ratio), ("--weight_decay", 0.05), ("--epochs", 200),
                        ("--blr", 1.5e-4)):
        entry = help_text.split(f"{flag} {flag[2:].upper()} ")[-1].split(" --", 1)[0]  # the options list's line
        assert f"(default: {value})" in entry, flag


def test_presets_are_recipes():
    demo_args = vars(main_pretrain.parse_args(["--device", "cpu", "--demo"]))
    recipe_args = vars(main_pretrain.parse_args(["--device", "cpu", "--recipe", "pretrain_demo"]))
    differ = {k for k in demo_args if demo_args[k] != recipe_args[k]}
    assert differ == {"demo", "recipe"}
    assert main_pretrain.RECIPES[main_pretrain.DEMO].source == "demo"
    probe = vars(main_finetune.parse_args(["--device", "cpu", "--linprobe"]))
    assert {k: probe[k] for k in RECIPES["linprobe_mae"].flags} == RECIPES["linprobe_mae"].flags


@pytest.mark.parametrize("script", ENTRY_POINT_PARSERS)
def test_every_entry_point_uses_the_shared_parser_without_abbreviations(script):
    parser = ENTRY_POINT_PARSERS[script]()
    assert parser.allow_abbrev is False and parser.formatter_class is HelpFormatter, script


def test_an_abbreviated_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        visualize.get_args_parser().parse_args(["--teacher", "x", "--images", "a", "--output_d", "out"])
    assert exc.value.code == 2 and "unrecognized arguments: --output_d" in capsys.readouterr().err


def test_the_launcher_passes_its_stop_policy_to_the_entry_point(monkeypatch):
    from util import slurm
    received = {}

    class EntryPoint:
        __name__ = "fake_entry_point"

        @staticmethod
        def run(argv, stop_policy):
            received.update(argv=argv, policy=stop_policy)
            return 0

    job = slurm.TrainingJob("pretrain", ["--output_dir", "/tmp/x"])
    assert job._run(EntryPoint, job.argv, slurm.submitit_stop_policy(signal.SIGUSR2)) == 0
    policy = received["policy"]
    assert policy.requeued_by_launcher and policy.actions[signal.SIGUSR2] == "stop"
    assert policy.actions[signal.SIGTERM] == "save"


def test_building_from_flags_lives_next_to_the_model(teacher_file):
    args = main_pretrain.parse_args(["--device", "cpu", "--model", "maskalign_vit_tiny_patch16", "--input_size", "32",
                                     "--teacher", "timm:vit_tiny_patch16_224", "--teacher_weights", teacher_file,
                                     "--teacher_kwargs", "depth=3", "embed_dim=48", "num_heads=3",
                                     "--model_kwargs", "depth=2", "--top_k", "2", "--mask_type", "random"])
    model = models_maskalign.build_from_args(args)
    assert (len(model.blocks), model.config.top_k, model.config.mask_type) == (2, 2, "random")
