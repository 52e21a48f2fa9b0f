"""`--compile`: torch.compile in place, and the counts that show a run stays compiled (graph breaks, recompiles)."""
import torch
from torch._dynamo.utils import counters


def compile_in_place(module: torch.nn.Module) -> "CompileWatch":
    """Compile `module`'s forward (and so its backward) in place: its parameter names, state dict, DDP wrapping
    and hooks stay as they are. Random ops draw from torch's eager generator (inductor's `fallback_random`), so
    a compiled step samples the same masks and drop paths as an eager one and the two give the same numbers."""
    torch._inductor.config.fallback_random = True
    module.compile()
    return CompileWatch()


class CompileWatch:
    """Graphs compiled and graph breaks so far in this process; graphs added after `mark_warm` are recompiles."""

    def __init__(self) -> None:
        self.warm_graphs: int | None = None

    @staticmethod
    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    @staticmethod
    def graph_breaks() -> int:
        return sum(counters["graph_break"].values())

    def mark_warm(self) -> None:
        self.warm_graphs = self.graphs()

    def recompiles(self) -> int:
        return 0 if self.warm_graphs is None else self.graphs() - self.warm_graphs

    def summary(self) -> str:
        breaks = "; ".join(f"{reason} ({n}x)" for reason, n in counters["graph_break"].items())
        text = f"torch.compile: {self.graphs()} graph(s), {self.graph_breaks()} graph break(s)"
        if breaks:
            text += f" [{breaks}]"
        if self.warm_graphs is not None:
            text += f", {self.recompiles()} recompile(s) after warm-up"
        return text
