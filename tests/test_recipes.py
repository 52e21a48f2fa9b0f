"""Named recipes (`--recipe NAME`): each parses, sets what it claims, explicit flags win (issue #10, item 3)."""
import pytest

import main_finetune
import main_pretrain
from util.recipes import LINPROBE_EFFECTIVE_BATCH, MAE_LINPROBE, RECIPES, recipes_for

ENTRY_POINTS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_finetune}
GPUS = 8  # the recipes' per-GPU batch sizes assume torchrun --nproc_per_node=8


def parse(name, *extra):
    return ENTRY_POINTS[RECIPES[name].task].parse_args(["--device", "cpu", "--recipe", name, *extra])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_and_sets_every_flag_it_names(name):
    args = parse(name)
    assert args.recipe == name
    plain = vars(ENTRY_POINTS[RECIPES[name].task].parse_args(["--device", "cpu"]))
    for dest, value in RECIPES[name].flags.items():
        assert dest in plain, f"{name}: {dest} is not a flag of its entry point"
        assert getattr(args, dest) == value, (name, dest)


@pytest.mark.parametrize("name", RECIPES)
def test_explicit_flags_win_over_a_recipe(name):
    args = parse(name, "--blr", "0.5", "--epochs", "3", "--batch_size", "6", "--accum_iter", "1")
    assert (args.blr, args.epochs, args.batch_size, args.accum_iter) == (0.5, 3, 6, 1)
    args = ENTRY_POINTS[RECIPES[name].task].parse_args(["--device", "cpu", "--blr", "0.5", f"--recipe={name}"])
    assert args.blr == 0.5 and args.recipe == name  # whatever the order, and with --recipe=NAME


def test_defaults_are_the_papers_and_linprobe_is_maes():
    for name, entry, argv in (("pretrain_b16_paper", main_pretrain, []), ("finetune_b16_paper", main_finetune, []),
                              ("linprobe_mae", main_finetune, ["--linprobe"])):
        args = entry.parse_args(["--device", "cpu", *argv])
        assert {k: getattr(args, k) for k in RECIPES[name].flags} == RECIPES[name].flags, name
    assert RECIPES["linprobe_mae"].flags == dict(MAE_LINPROBE, linprobe=True)


def test_documented_differences_between_paper_and_release():
    flags = {name: recipe.flags for name, recipe in RECIPES.items()}
    assert flags["finetune_b16_paper"]["layer_decay"] == 0.6 and flags["finetune_b16_release"]["layer_decay"] == 0.55
    assert (flags["pretrain_b16_paper"]["min_lr"], flags["pretrain_b16_release"]["min_lr"]) == (0.0, 1e-5)
    large = flags["finetune_l16_release"]
    assert (large["model"], large["epochs"], large["drop_path"], large["layer_decay"], large["blr"]) == \
        ("vit_large_patch16_224", 50, 0.4, 0.75, 3e-4)
    assert flags["pretrain_l16_release"]["drop_path"] == 0.2 and flags["pretrain_l16_paper"]["drop_path"] == 0.1
    # Dynamic Alignment: eq. (1) in the paper's recipes, the reference code's mix-then-adapt in the release's
    for name, recipe in recipes_for("pretrain").items():
        if recipe.source == "demo":
            continue
        assert recipe.flags["align"] == {"paper": "dynamic", "release": "official"}[recipe.source], name
    # what differs between a paper recipe and its release twin is exactly what the docs list
    assert diff(flags["pretrain_b16_paper"], flags["pretrain_b16_release"]) == {"min_lr", "align"}
    assert diff(flags["pretrain_l16_paper"], flags["pretrain_l16_release"]) == {"min_lr", "align", "drop_path"}
    assert diff(flags["finetune_b16_paper"], flags["finetune_b16_release"]) == {"layer_decay"}
    assert diff(flags["finetune_l16_paper"], flags["finetune_l16_release"]) == {"epochs", "layer_decay", "drop_path"}
    assert diff(flags["linprobe_mae"], flags["linprobe_release"]) == {"batch_size", "accum_iter", "blr"}


def diff(a: dict, b: dict) -> set:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@pytest.mark.parametrize("name, lr", [("linprobe_mae", 6.4), ("linprobe_release", 1.6)])
def test_linprobe_recipes_reach_16384_on_8_gpus(name, lr):
    args = parse(name)
    effective = args.batch_size * args.accum_iter * GPUS
    assert effective == LINPROBE_EFFECTIVE_BATCH and args.blr * effective / 256 == pytest.approx(lr)
    assert args.linprobe and args.opt == "lars" and not args.global_pool


def test_recipe_of_another_entry_point_or_task_is_refused(capsys):
    for entry, argv in ((main_pretrain, ["--recipe", "finetune_b16_paper"]),
                        (main_finetune, ["--recipe", "pretrain_b16_paper"]),
                        (main_finetune, ["--recipe", "finetune_b16_paper", "--linprobe"]),
                        (main_finetune, ["--recipe", "no_such_recipe"])):
        with pytest.raises(SystemExit) as exc:
            entry.parse_args(["--device", "cpu", *argv])
        assert exc.value.code == 2, argv
    assert "drop --linprobe" in capsys.readouterr().err


@pytest.mark.parametrize("entry, task", [(main_pretrain, ("pretrain",)), (main_finetune, ("finetune", "linprobe"))])
def test_help_lists_the_recipes(entry, task, capsys):
    with pytest.raises(SystemExit) as exc:
        entry.parse_args(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for name, recipe in recipes_for(*task).items():
        assert f"{name}  " in out and recipe.summary in out.replace("\n", " ")
