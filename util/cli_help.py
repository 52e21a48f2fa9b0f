"""--help formatting shared by the entry points and the SLURM launcher (kept free of heavy imports, so the
launcher's --help stays fast)."""
import argparse
import copy
import re

_STATES_DEFAULT = re.compile(r"\(default|default:|by default", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default exactly once: appended unless the help text already states it,
    also for options without help text (argparse shows nothing for them). A switch says whether it is on by
    default (argparse would print its destination's value: True for --cls_token, which is off)."""

    def add_argument(self, action: argparse.Action) -> None:
        if not action.help and _shows_default(action):
            action = copy.copy(action)  # the parser's own action keeps its (empty) help
            action.help = f"(default: {_default_text(action)})"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action) or _STATES_DEFAULT.search(text):
            return text
        return f"{text} (default: {_default_text(action)})"


def _shows_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default is not argparse.SUPPRESS


def _default_text(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    if action.nargs == 0:  # store_true / store_false / store_const
        return "on" if action.default == action.const else "off"
    return "not set" if action.default in (None, "") else "%(default)s"
